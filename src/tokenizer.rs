//! Loading Hugging Face `tokenizer.json` files, and training a small byte-level BPE one
//! (for the demo and the tests) with the `tokenizers` crate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "tokenizer {path} does not exist; pass --tokenizer PATH to a Hugging Face tokenizer.json"
    )]
    Missing { path: PathBuf },
    #[error(
        "cannot load tokenizer {path}: {why}; pass a Hugging Face tokenizer.json (the `tokenizer.json` of the teacher's repository)"
    )]
    Load { path: PathBuf, why: String },
    #[error("cannot train tokenizer: {0}")]
    Train(String),
}

/// A loaded tokenizer with the facts the stages need.
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    /// Largest token id + 1 (added tokens included).
    pub vocab_size: usize,
    /// Id used to pad batches (masked out, so any id works): the tokenizer's pad token if
    /// it has one, else 0.
    pub pad_id: u32,
}

/// Loads `tokenizer.json`.
pub fn load(path: &Path) -> Result<LoadedTokenizer, TokenizerError> {
    if path.is_dir() {
        return Err(TokenizerError::Load {
            path: path.to_path_buf(),
            why: format!(
                "it is a directory{}",
                if path.join("tokenizer.json").is_file() {
                    format!(" (pass {})", path.join("tokenizer.json").display())
                } else {
                    String::new()
                }
            ),
        });
    }
    if !path.is_file() {
        return Err(TokenizerError::Missing {
            path: path.to_path_buf(),
        });
    }
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| {
        // Valid JSON of another kind (a config.json, a vocab.json) is named as such, not
        // reported as the parser's complaint about a missing field.
        let json = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let why = match json {
            Some(serde_json::Value::Object(m)) if !m.contains_key("model") => {
                let mut keys: Vec<&str> = m.keys().map(String::as_str).take(8).collect();
                keys.sort();
                format!(
                    "it is JSON but not a tokenizer.json (no `model` key; its keys: {})",
                    keys.join(", ")
                )
            }
            Some(v) if !v.is_object() => {
                "it is JSON but not a tokenizer.json (not an object)".to_string()
            }
            _ => e.to_string(),
        };
        TokenizerError::Load {
            path: path.to_path_buf(),
            why,
        }
    })?;
    let vocab_size = tokenizer
        .get_vocab(true)
        .values()
        .max()
        .map(|m| *m as usize + 1)
        .unwrap_or(0);
    if vocab_size == 0 {
        return Err(TokenizerError::Load {
            path: path.to_path_buf(),
            why: "its vocabulary is empty".into(),
        });
    }
    let pad_id = tokenizer
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tokenizer.token_to_id("<pad>"))
        .unwrap_or(0);
    // Documents are cut into windows here: a tokenizer.json's own truncation would drop the
    // rest of every long document, and its padding would put pad ids inside documents (both
    // silently, as they did before this was checked).
    if let Some(t) = tokenizer.get_truncation() {
        tracing::warn!(
            "{} truncates to {} tokens; logitcache ignores that and cuts documents into --seq-len windows itself (no text is dropped)",
            path.display(),
            t.max_length
        );
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
    }
    if tokenizer.get_padding().is_some() {
        tracing::info!(
            "{} pads its encodings; logitcache ignores that (batches are padded and masked by the stages)",
            path.display()
        );
        tokenizer.with_padding(None);
    }
    Ok(LoadedTokenizer {
        tokenizer,
        vocab_size,
        pad_id,
    })
}

/// Special tokens of the trained tokenizers, with ids 0..4 in this order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<s>", "</s>", "<unk>", "<pad>"];

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`, adding `<s>`
/// and `</s>` around every encoded text, and saves it as `out`.
pub fn train_bpe(texts: &[String], vocab_size: usize, out: &Path) -> Result<(), TokenizerError> {
    let t = |e: tokenizers::Error| TokenizerError::Train(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let bl = ByteLevel::default().add_prefix_space(false);
    let mut tok: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(bl))
            .with_post_processor(None)
            .with_decoder(Some(bl))
            .build()
            .map_err(t)?;
    tok.train(&mut trainer, texts.iter()).map_err(t)?;
    let id = |s: &str| {
        tok.token_to_id(s).ok_or_else(|| {
            TokenizerError::Train(format!("special token {s} missing after training"))
        })
    };
    let (bos, eos) = (id("<s>")?, id("</s>")?);
    let tp = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .map_err(TokenizerError::Train)?
        .special_tokens(vec![("<s>", bos), ("</s>", eos)])
        .build()
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    tok.with_post_processor(Some(tp));
    tok.save(out, false).map_err(t)?;
    Ok(())
}

/// Writes a word-level tokenizer with exactly `vocab_size` ids: the special tokens, the most
/// frequent whitespace-separated words of `texts`, then filler tokens. For benchmarks that
/// need a real vocabulary size (32k, 152k) without training a BPE that large.
pub fn word_level_tokenizer(
    texts: &[String],
    vocab_size: usize,
    out: &Path,
) -> Result<(), TokenizerError> {
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in texts {
        for w in t
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut words: Vec<(&str, usize)> = counts.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for s in SPECIAL_TOKENS {
        vocab.insert(s.to_string(), vocab.len() as u32);
    }
    let punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    for c in punct.chars() {
        vocab.insert(c.to_string(), vocab.len() as u32);
    }
    for (w, _) in words {
        if vocab.len() >= vocab_size {
            break;
        }
        let next = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(next);
    }
    let mut filler = 0;
    while vocab.len() < vocab_size {
        vocab.insert(format!("<filler{filler}>"), vocab.len() as u32);
        filler += 1;
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let tp = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .map_err(TokenizerError::Train)?
        .special_tokens(vec![("<s>", 0), ("</s>", 1)])
        .build()
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    tok.with_post_processor(Some(tp));
    tok.save(out, false)
        .map_err(|e| TokenizerError::Train(e.to_string()))
}

/// Documents longer than this (bytes of UTF-8) are tokenised in pieces of about this size
/// when [`piecewise_blocker`] allows it: the whole document's encoding (offsets, token
/// strings, and the normaliser's alignments per byte) took 5 GB for one of 20 MB.
pub const LONG_DOCUMENT_BYTES: usize = 1 << 20;

/// The `Split` regexes of the Llama 3 (also tiktoken's cl100k) and Qwen 2 pre-tokenizers,
/// as their tokenizer.json files spell them. Neither has an alternative that matches a
/// non-whitespace character followed by a space: the contractions and `\p{N}` runs hold no
/// space, `[^\r\n\p{L}\p{N}]?\p{L}+` and ` ?[^\s\p{L}\p{N}]+[\r\n]*` hold one only as their
/// first character, and the `\s` alternatives hold only whitespace. So every position
/// between a non-whitespace character and a space is a match boundary, and with no
/// look-behind the matches after it are the same whether the text starts there or not: a cut
/// before such a space changes nothing.
pub const SPACE_BOUNDED_SPLIT_REGEXES: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// Why `tok` cannot be applied to a text piece by piece with exactly the ids of the whole
/// text, or `None` when it can. The pieces are cut before a single ASCII space between two
/// non-space characters, so the check is that every step treats that space as a hard
/// boundary: a normaliser that works character by character, a pre-tokenizer that splits
/// there (whitespace, BERT, byte-level with its regex, Metaspace with `split`, the `Split`
/// regexes of Llama 3 and Qwen 2 ([`SPACE_BOUNDED_SPLIT_REGEXES`])) followed only by ones
/// that split further, and no added token that could span or absorb the space. A tokenizer
/// outside these (a `Prepend` normaliser as in Llama 2, any other `Split` pattern,
/// truncation) is tokenised whole.
pub fn piecewise_blocker(tok: &Tokenizer) -> Option<String> {
    use tokenizers::SplitDelimiterBehavior;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper as P;
    use tokenizers::pre_tokenizers::split::SplitPattern;
    fn normalizer_ok(n: &NormalizerWrapper) -> bool {
        use NormalizerWrapper as N;
        match n {
            N::NFC(_)
            | N::NFD(_)
            | N::NFKC(_)
            | N::NFKD(_)
            | N::Lowercase(_)
            | N::StripAccents(_)
            | N::BertNormalizer(_)
            | N::Nmt(_)
            | N::ByteLevel(_) => true,
            N::Sequence(s) => s.as_ref().iter().all(normalizer_ok),
            _ => false,
        }
    }
    let splits_at_spaces = |p: &P| match p {
        P::Whitespace(_) | P::WhitespaceSplit(_) | P::BertPreTokenizer(_) => true,
        P::ByteLevel(b) => b.use_regex,
        P::Metaspace(m) => m.get_split(),
        P::Split(s) => {
            matches!(&s.pattern, SplitPattern::Regex(r) if SPACE_BOUNDED_SPLIT_REGEXES.contains(&r.as_str()))
                && s.behavior == SplitDelimiterBehavior::Isolated
                && !s.invert
        }
        _ => false,
    };
    let refines = |p: &P| match p {
        P::Punctuation(_) | P::Digits(_) => true,
        P::ByteLevel(b) => !b.use_regex,
        _ => false,
    };
    if tok.get_truncation().is_some() {
        return Some("it truncates".into());
    }
    if let Some(n) = tok.get_normalizer()
        && !normalizer_ok(n)
    {
        return Some("its normalizer is not character by character".into());
    }
    let ok = match tok.get_pre_tokenizer() {
        None => false,
        Some(P::Sequence(s)) => {
            let steps = s.as_ref();
            !steps.is_empty() && splits_at_spaces(&steps[0]) && steps[1..].iter().all(refines)
        }
        Some(p) => splits_at_spaces(p),
    };
    if !ok {
        return Some("its pre-tokenizer does not always split at spaces".into());
    }
    if let Some(t) = tok
        .get_added_tokens_decoder()
        .values()
        .find(|t| t.rstrip || t.content.chars().any(char::is_whitespace))
    {
        return Some(format!(
            "its added token {:?} could span or absorb a space",
            t.content
        ));
    }
    None
}

/// Whether [`encode_piecewise`] may cut `text` before byte `i`: a single ASCII space between
/// two non-whitespace characters (the boundary [`piecewise_blocker`] checks every step keeps).
pub fn is_cut_point(text: &str, i: usize) -> bool {
    text.as_bytes().get(i) == Some(&b' ')
        && text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| !c.is_whitespace())
        && text[i + 1..]
            .chars()
            .next()
            .is_some_and(|c| !c.is_whitespace())
}

/// The ids of `tok.encode(text, true)`, computed piece by piece (pieces of about `piece`
/// bytes, see [`piecewise_blocker`]), with the post-processor's special tokens put around
/// them as it puts them around the whole text. `None` when the tokenizer does not allow it
/// or its post-processor does more than add tokens at both ends.
pub fn encode_piecewise(
    tok: &Tokenizer,
    text: &str,
    piece: usize,
) -> tokenizers::Result<Option<Vec<u32>>> {
    if piecewise_blocker(tok).is_some() {
        return Ok(None);
    }
    let b = text.as_bytes();
    let mut ids: Vec<u32> = Vec::new();
    let mut first: Option<tokenizers::Encoding> = None;
    let mut start = 0usize;
    while start < b.len() {
        // The next cut.
        let mut end = b.len();
        let mut i = (start + piece.max(1)).min(b.len());
        while i < b.len() {
            if is_cut_point(text, i) {
                end = i;
                break;
            }
            i += 1;
        }
        let enc = tok.encode_fast(&text[start..end], false)?;
        ids.extend_from_slice(enc.get_ids());
        if first.is_none() {
            first = Some(enc);
        }
        start = end;
    }
    // prefix + first piece + suffix, from the post-processor itself.
    let first = first.unwrap_or_default();
    let n = first.get_ids().len();
    let first_ids = first.get_ids().to_vec();
    let around = tok.post_process(tokenizers::Encoding::default(), None, true)?;
    let around = around.get_ids();
    let processed = tok.post_process(first, None, true)?;
    let got = processed.get_ids();
    if got.len() != n + around.len() {
        return Ok(None);
    }
    let fits = |p: usize| {
        got[..p] == around[..p] && got[p..p + n] == first_ids[..] && got[p + n..] == around[p..]
    };
    let places: Vec<usize> = (0..=around.len()).filter(|&p| fits(p)).collect();
    let [p] = places[..] else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(ids.len() + around.len());
    out.extend_from_slice(&around[..p]);
    out.extend_from_slice(&ids);
    out.extend_from_slice(&around[p..]);
    Ok(Some(out))
}
