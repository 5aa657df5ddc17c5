//! Long documents tokenised piece by piece give exactly the ids of the whole document, for
//! every tokenizer kind that allows it (byte-level BPE, word-level, Metaspace, the Split
//! regexes of Llama 3 and Qwen 2), and the others (a Prepend normaliser, another Split
//! pattern or behaviour, an added token that absorbs spaces) are
//! tokenised whole; end to end, a document over the threshold gives the cache of the whole.

use crate::util::*;
use logitcache::tokenizer::{
    LONG_DOCUMENT_BYTES, SPACE_BOUNDED_SPLIT_REGEXES, encode_piecewise, is_cut_point,
    piecewise_blocker,
};
use tokenizers::Tokenizer;

/// Texts with every kind of space and character around the cuts: runs of spaces, tabs,
/// newlines, punctuation, digits, contractions, accents, CJK and emoji.
fn texts() -> Vec<String> {
    let words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "it's",
        "don't",
        "42",
        "3.14",
        "café",
        "naïve",
        "日本語",
        "🎉",
        "(x)",
        "end.",
        "--",
        "A",
        "Über",
        "x'y",
        "ok!",
        "foo_bar",
        "1,000",
        "123456789",
        "x.\r\n",
    ];
    let seps = [
        " ", " ", " ", " ", "  ", "\n", "\t", " \n ", "\n\n", "   ", " . ", ", ", "\r\n",
    ];
    let mut state: u64 = 7;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    (0..120)
        .map(|i| {
            let mut t = String::new();
            if i % 3 == 0 {
                t.push(' ');
            }
            for _ in 0..(20 + next(300)) {
                t.push_str(words[next(words.len())]);
                t.push_str(seps[next(seps.len())]);
            }
            t
        })
        .collect()
}

/// The pre-tokens of `text` under `tok`'s normaliser and pre-tokenizer.
fn pre_tokens(tok: &Tokenizer, text: &str) -> Vec<String> {
    use tokenizers::{
        NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };
    let mut n = NormalizedString::from(text);
    if let Some(norm) = tok.get_normalizer() {
        norm.normalize(&mut n).unwrap();
    }
    let mut p = PreTokenizedString::from(n);
    if let Some(pre) = tok.get_pre_tokenizer() {
        pre.pre_tokenize(&mut p).unwrap();
    }
    p.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

fn assert_piecewise_exact(name: &str, tok: &Tokenizer) {
    assert_eq!(piecewise_blocker(tok), None, "{name}");
    // The property the cuts rely on, at every cut point (a single space between two
    // non-whitespace characters) of the first texts: the pre-tokens of the whole are those
    // of the part before it followed by those of the part after it. (Equal ids alone could
    // hide a moved boundary that no merge of the test's vocabulary crosses.)
    for (i, text) in texts().iter().take(30).enumerate() {
        let whole = pre_tokens(tok, text);
        for cut in (0..text.len()).filter(|&c| is_cut_point(text, c)) {
            let mut parts = pre_tokens(tok, &text[..cut]);
            parts.extend(pre_tokens(tok, &text[cut..]));
            assert_eq!(parts, whole, "{name}: text {i}, cut at byte {cut}");
        }
    }
    for (i, text) in texts().iter().enumerate() {
        let whole = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        for piece in [1, 5, 17, 64, 300] {
            let got = encode_piecewise(tok, text, piece).unwrap();
            assert_eq!(
                got.as_ref(),
                Some(&whole),
                "{name}: text {i}, pieces of {piece}"
            );
        }
    }
}

fn edited(f: impl FnOnce(&mut serde_json::Value)) -> Tokenizer {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tokenizer()).unwrap()).unwrap();
    f(&mut v);
    Tokenizer::from_bytes(serde_json::to_vec(&v).unwrap()).unwrap()
}

#[test]
fn pieces_give_the_whole_documents_ids() {
    // The test's byte-level BPE with `<s> $A </s>`.
    let bpe = Tokenizer::from_file(tokenizer()).unwrap();
    assert_piecewise_exact("byte-level BPE", &bpe);
    // Word-level over whitespace.
    let path = shared_dir().join("piecewise-word-level.json");
    let corpus_texts: Vec<String> = texts();
    logitcache::tokenizer::word_level_tokenizer(&corpus_texts, 300, &path).unwrap();
    assert_piecewise_exact("word-level", &Tokenizer::from_file(&path).unwrap());
    // Metaspace (SentencePiece-style) BPE, with each prepend scheme.
    for scheme in ["first", "always", "never"] {
        let tok = metaspace_bpe(&corpus_texts, scheme);
        assert_piecewise_exact(&format!("Metaspace {scheme}"), &tok);
    }
    // The pre-tokenizers of Llama 3 and Qwen 2 (a Split regex, then byte-level without its
    // own regex; Qwen's NFC normaliser), over the test's byte-level BPE.
    for (name, regex) in [
        ("Llama 3", SPACE_BOUNDED_SPLIT_REGEXES[0]),
        ("Qwen 2", SPACE_BOUNDED_SPLIT_REGEXES[1]),
    ] {
        let tok = edited(|v| {
            v["pre_tokenizer"] = split_pre_tokenizer(regex, "Isolated");
            if name == "Qwen 2" {
                v["normalizer"] = serde_json::json!({"type": "NFC"});
            }
        });
        assert_piecewise_exact(name, &tok);
    }
}

/// A pre-tokenizer as Llama 3's and Qwen 2's tokenizer.json spell it.
fn split_pre_tokenizer(regex: &str, behavior: &str) -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]})
}

fn metaspace_bpe(texts: &[String], scheme: &str) -> Tokenizer {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::template::TemplateProcessing;
    let scheme = match scheme {
        "first" => PrependScheme::First,
        "always" => PrependScheme::Always,
        _ => PrependScheme::Never,
    };
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, true)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(300)
        .show_progress(false)
        .special_tokens(vec![
            tokenizers::AddedToken::from("<s>", true),
            tokenizers::AddedToken::from("</s>", true),
        ])
        .build()
        .into();
    tok.train(&mut trainer, texts.iter()).unwrap();
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A </s>")
            .unwrap()
            .special_tokens(vec![("<s>", 0), ("</s>", 1)])
            .build()
            .unwrap(),
    ));
    tok
}

#[test]
fn tokenizers_that_depend_on_the_whole_text_are_not_cut() {
    let cases: Vec<(&str, Tokenizer)> = vec![
        (
            "normalizer",
            edited(|v| v["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "▁"})),
        ),
        (
            "pre-tokenizer",
            edited(|v| v["pre_tokenizer"] = split_pre_tokenizer("\\s+", "Isolated")),
        ),
        // Llama 3's regex, but the matches merged with the text before them.
        (
            "pre-tokenizer",
            edited(|v| {
                v["pre_tokenizer"] =
                    split_pre_tokenizer(SPACE_BOUNDED_SPLIT_REGEXES[0], "MergedWithPrevious")
            }),
        ),
        (
            "added token",
            edited(|v| {
                v["added_tokens"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({
                        "id": VOCAB, "content": "<x>", "single_word": false, "lstrip": false,
                        "rstrip": true, "normalized": false, "special": true
                    }))
            }),
        ),
    ];
    for (what, tok) in cases {
        let why = piecewise_blocker(&tok).unwrap_or_else(|| panic!("{what} not refused"));
        assert!(why.contains(what), "{what}: {why}");
        assert_eq!(encode_piecewise(&tok, "a b c", 1).unwrap(), None, "{what}");
    }
}

#[test]
fn a_long_document_gives_the_cache_of_the_whole() {
    // One document past the threshold, tokenised in pieces; its windows hold exactly the
    // ids of the whole document's encoding.
    let text: String = texts().concat().repeat(LONG_DOCUMENT_BYTES / 20_000 + 1);
    assert!(text.len() > LONG_DOCUMENT_BYTES);
    let dir = fresh_dir("long-doc");
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("one.jsonl");
    std::fs::write(
        &corpus,
        serde_json::json!({ "text": text }).to_string() + "\n",
    )
    .unwrap();
    let out = dir.join("cache");
    let mut args = teacher_args(&plain_model(), &out, 1);
    let c = args.iter().position(|a| a == "--corpus").unwrap();
    args[c + 1] = corpus.to_str().unwrap().into();
    for (flag, value) in [("--seq-len", "512"), ("--shard-size", "4096")] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.into();
    }
    let o = run_strings(&args);
    assert_ok(&o);
    assert!(!stderr(&o).contains("tokenised whole"), "{}", stderr(&o));
    let whole = Tokenizer::from_file(tokenizer())
        .unwrap()
        .encode(text.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(all_rows(&out).input_ids, whole);
}

#[test]
fn a_tokenizers_own_truncation_and_padding_are_ignored() {
    // A tokenizer.json that truncates to 8 tokens and pads batches to their longest: the
    // teacher cuts windows itself, so the cache holds every token and no pad inside.
    let path = shared_dir().join("truncating-tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tokenizer()).unwrap()).unwrap();
    v["truncation"] = serde_json::json!({
        "direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0
    });
    v["padding"] = serde_json::json!({
        "strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 3, "pad_type_id": 0, "pad_token": "<pad>"
    });
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let (plain, edited) = (fresh_dir("trunc-plain"), fresh_dir("trunc-edited"));
    let mut runs = Vec::new();
    for (out, tok) in [(&plain, tokenizer()), (&edited, path.clone())] {
        let mut args = teacher_args(&plain_model(), out, 30);
        let t = args.iter().position(|a| a == "--tokenizer").unwrap();
        args[t + 1] = tok.to_str().unwrap().into();
        let o = run_strings(&args);
        assert_ok(&o);
        runs.push(o);
    }
    assert!(
        stderr(&runs[1]).contains("truncates to 8 tokens"),
        "{}",
        stderr(&runs[1])
    );
    let (a, b) = (all_rows(&plain), all_rows(&edited));
    assert!(a.input_ids.len() > 30 * 8);
    assert_eq!(a.seq_ids, b.seq_ids);
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.topk_ids, b.topk_ids);
}
