//! Top-k + log-softmax of one row of logits on the host, with the exact log-mass outside the
//! top-k.
//!
//! Three passes over the row, each written so the compiler vectorises it:
//! 1. block maxima and a finiteness check;
//! 2. a threshold scan that keeps a small candidate buffer for the top k + 1, starting from
//!    a threshold the block maxima guarantee (most values fail one compare);
//! 3. one `exp` per value (a Cephes-style polynomial, rel. error ~1e-7), summed over the
//!    values outside the top-k relative to the largest of them (the (k+1)-th value). The tail
//!    is thus a direct sum that keeps its precision whether it is 1e-9 or 1e-200 of the mass;
//!    the partition function is the top-k's k exps (in f64) plus that tail.
//!
//! Ties are broken by the lower token id, so the result equals a full stable sort by
//! (logit descending, id ascending).
//!
//! ```
//! use logitcache::teacher::topk::{TopK, TopKScratch};
//! let row = [1.0f32, 3.0, 2.0, 0.0];
//! let mut s = TopKScratch::default();
//! let (mut ids, mut lp) = ([0u32; 2], [0f32; 2]);
//! let tail = TopK { k: 2, inv_temperature: 1.0 }.row(&row, &mut s, &mut ids, &mut lp).unwrap();
//! assert_eq!(ids, [1, 2]);
//! let mass: f32 = lp.iter().map(|v| v.exp()).sum::<f32>() + tail.exp();
//! assert!((mass - 1.0).abs() < 1e-5);
//! ```

/// Why a row could not be reduced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    /// Index of the first NaN or infinite logit.
    pub index: usize,
    pub value: f32,
}

/// Reusable buffers for [`TopK::row`] (one per thread).
#[derive(Debug, Default)]
pub struct TopKScratch {
    cand: Vec<(f32, u32)>,
    f32_row: Vec<f32>,
    /// Maxima of the row's blocks of [`MAX_BLOCK`] values.
    block_max: Vec<f32>,
}

impl TopKScratch {
    /// A buffer to convert an f16 row into before calling [`TopK::row`].
    pub fn f32_buffer(&mut self, len: usize) -> &mut Vec<f32> {
        self.f32_row.resize(len, 0.0);
        &mut self.f32_row
    }
}

/// The reduction's parameters.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    pub k: usize,
    /// 1 / temperature (> 0).
    pub inv_temperature: f32,
}

#[inline(always)]
fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    // Descending value, then ascending id.
    b.0.partial_cmp(&a.0)
        .expect("candidates are finite: this is a bug")
        .then(a.1.cmp(&b.1))
}

/// exp(x) for x <= 0, vectorisable (Cephes `expf` polynomial, magic-number rounding).
/// Below -87 (e^-87 ≈ 1.6e-38, the end of normal f32) it returns 0: such terms change a
/// partition function of at least 1 by less than 1e-33.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let tiny = x < -87.0;
    let x = x.max(-87.0);
    // t = 1.5·2^23 + n: its low mantissa bits hold the integer n (no float→int cast, which
    // would stop vectorisation).
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let pow2n = f32::from_bits(n_int.wrapping_add(127) << 23);
    if tiny { 0.0 } else { y * pow2n }
}

/// Values per block of pass 1's block maxima.
const MAX_BLOCK: usize = 64;

/// The maxima of the row's blocks of [`MAX_BLOCK`] values (into `block_max`) and a poison
/// sum (NaN iff the row holds a NaN or an infinity), in 8 independent lanes so the loop
/// vectorises.
#[inline(always)]
fn block_max_and_poison(row: &[f32], block_max: &mut Vec<f32>) -> f32 {
    block_max.clear();
    let mut poison = [0.0f32; 8];
    for block in row.chunks(MAX_BLOCK) {
        let mut max = [f32::NEG_INFINITY; 8];
        let mut lanes = block.chunks_exact(8);
        for c in &mut lanes {
            let c: &[f32; 8] = c.try_into().expect("chunks of 8: this is a bug");
            for j in 0..8 {
                max[j] = if c[j] > max[j] { c[j] } else { max[j] };
                poison[j] += c[j] * 0.0;
            }
        }
        for &x in lanes.remainder() {
            max[0] = if x > max[0] { x } else { max[0] };
            poison[0] += x * 0.0;
        }
        block_max.push(
            max.iter()
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }),
        );
    }
    poison.iter().sum()
}

/// Sum of exp((x - reference) * scale) over the values below `kth`. The exps, masked to the
/// values below `kth`, are an element-wise map and the sum runs in 8 lanes: both loops
/// vectorise (a sum with a branch per element, or an integer count beside it, does not).
#[inline(always)]
fn exp_sum_below(row: &[f32], reference: f32, scale: f32, kth: f32) -> f64 {
    const CHUNK: usize = 1024;
    let mut es = [0.0f32; CHUNK];
    let mut total = 0.0f64;
    for chunk in row.chunks(CHUNK) {
        let es = &mut es[..chunk.len()];
        for (e, &x) in es.iter_mut().zip(chunk) {
            // Values from `kth` up are the top-k's (or ties with it, counted by the caller):
            // masked out, their exp argument clamped so it cannot overflow.
            let v = exp_nonpos(((x - reference) * scale).min(0.0));
            *e = if x < kth { v } else { 0.0 };
        }
        let mut lanes = [0.0f32; 8];
        let mut blocks = es.chunks_exact(8);
        for e in &mut blocks {
            let e: &[f32; 8] = e.try_into().expect("chunks of 8: this is a bug");
            for j in 0..8 {
                lanes[j] += e[j];
            }
        }
        lanes[0] += blocks.remainder().iter().sum::<f32>();
        total += lanes.iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

// The same loops compiled for AVX2 + FMA, chosen at run time when the CPU has them (the
// portable build targets SSE2 only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_max_and_poison_avx2(row: &[f32], block_max: &mut Vec<f32>) -> f32 {
    block_max_and_poison(row, block_max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sum_below_avx2(row: &[f32], reference: f32, scale: f32, kth: f32) -> f64 {
    exp_sum_below(row, reference, scale, kth)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

fn dispatch_max(row: &[f32], block_max: &mut Vec<f32>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { block_max_and_poison_avx2(row, block_max) };
    }
    block_max_and_poison(row, block_max)
}

fn dispatch_sum(row: &[f32], reference: f32, scale: f32, kth: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { exp_sum_below_avx2(row, reference, scale, kth) };
    }
    exp_sum_below(row, reference, scale, kth)
}

impl TopK {
    /// Reduces `row` (raw logits) into the top-k ids and log-probs at temperature
    /// 1/`inv_temperature`, written in descending order into `ids` and `logprobs` (each of
    /// length k). Returns the log of the mass outside the top-k (`-inf` when k = row length).
    pub fn row(
        &self,
        row: &[f32],
        scratch: &mut TopKScratch,
        ids: &mut [u32],
        logprobs: &mut [f32],
    ) -> Result<f32, NonFinite> {
        let k = self.k;
        assert!(
            k >= 1 && k <= row.len() && ids.len() == k && logprobs.len() == k,
            "top-k arguments checked by the caller: this is a bug"
        );
        // Pass 1: max and finiteness (x * 0 is NaN exactly for NaN and +-inf).
        let poison = dispatch_max(row, &mut scratch.block_max);
        let max = scratch
            .block_max
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        if poison.is_nan() || !max.is_finite() {
            let index = row.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(NonFinite {
                index,
                value: row[index],
            });
        }

        // Pass 2: threshold scan for the k best values and, unless k is the whole row, the
        // best one outside them (the reference of the tail sum). Later equal values have
        // higher ids and lose the tie, so a strict `>` is exact.
        let keep = if k < row.len() { k + 1 } else { k };
        let cand = &mut scratch.cand;
        cand.clear();
        let cap = (2 * keep).max(keep + 32);
        // Start from the keep-th largest block maximum m (of the first 16·keep blocks, which
        // bounds the cost of finding it): those keep maxima are distinct values >= m, so
        // every one of the keep best is >= m too. Only values >= m are scanned in (a few
        // times keep instead of ~keep·ln(row / keep) pushes and sorts).
        let bm = &mut scratch.block_max;
        bm.truncate(16 * keep);
        let mut thr = if bm.len() > keep {
            let (_, m, _) = bm.select_nth_unstable_by(keep - 1, |a, b| {
                b.partial_cmp(a).expect("finite maxima: this is a bug")
            });
            m.next_down()
        } else {
            f32::NEG_INFINITY
        };
        let push = |cand: &mut Vec<(f32, u32)>, thr: &mut f32, i: usize, x: f32| {
            if x > *thr {
                cand.push((x, i as u32));
                if cand.len() == cap {
                    cand.select_nth_unstable_by(keep - 1, better);
                    cand.truncate(keep);
                    *thr = cand[keep - 1].0;
                }
            }
        };
        // Blocks of 16 are first tested as a whole (a vectorised count), so the common case
        // costs one branch per 16 values.
        const BLOCK: usize = 16;
        let mut blocks = row.chunks_exact(BLOCK);
        for (b, c) in (&mut blocks).enumerate() {
            let c: &[f32; BLOCK] = c.try_into().expect("chunks of 16: this is a bug");
            if c.iter().map(|&x| (x > thr) as u32).sum::<u32>() > 0 {
                for (j, &x) in c.iter().enumerate() {
                    push(cand, &mut thr, b * BLOCK + j, x);
                }
            }
        }
        let done = row.len() / BLOCK * BLOCK;
        for (j, &x) in blocks.remainder().iter().enumerate() {
            push(cand, &mut thr, done + j, x);
        }
        if cand.len() > keep {
            cand.select_nth_unstable_by(keep - 1, better);
            cand.truncate(keep);
        }
        cand.sort_unstable_by(better);
        let scale = self.inv_temperature;
        // The top-k's scaled logits relative to the max (the first is 0).
        let top = |j: usize| ((cand[j].0 - max) * scale) as f64;
        let top_sum: f64 = (0..k).map(|j| top(j).exp()).sum();
        let log_tail = if keep == k {
            f64::NEG_INFINITY
        } else {
            // Pass 3: the tail as a direct sum of exp(x - r) over the values outside the
            // top-k, r the largest of them: every term is at most 1 and r's own is 1, so the
            // sum never underflows, however peaked the row (a tail of e^-200 stays exact).
            let kth = cand[k - 1].0;
            let r = cand[k].0;
            let below = dispatch_sum(row, r, scale, kth);
            // Values equal to the k-th but not chosen (higher ids) are outside the top-k
            // too; there are some only when r ties with the k-th, and each weighs exp(0).
            let ties_out = if r == kth {
                row.iter().filter(|&&x| x == kth).count()
                    - cand[..k].iter().filter(|c| c.0 == kth).count()
            } else {
                0
            };
            ((r - max) * scale) as f64 + (below + ties_out as f64).ln()
        };
        // log Z relative to the max: top_sum >= 1, and log_tail <= ln(row length).
        let log_z = (top_sum + log_tail.exp()).ln();
        for (j, &(_, id)) in cand[..k].iter().enumerate() {
            ids[j] = id;
            logprobs[j] = (top(j) - log_z) as f32;
        }
        Ok((log_tail - log_z) as f32)
    }
}

/// The same reduction by a full sort in f64: the independent reference the tests compare with.
pub fn reference_topk(row: &[f32], k: usize, temperature: f64) -> (Vec<u32>, Vec<f64>, f64) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let scaled: Vec<f64> = row
        .iter()
        .map(|&x| (x as f64 - max) / temperature)
        .collect();
    let log_z = scaled.iter().map(|v| v.exp()).sum::<f64>().ln();
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    let ids: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
    let lps: Vec<f64> = order[..k].iter().map(|&i| scaled[i] - log_z).collect();
    // The tail's log-sum-exp relative to its own largest term, so it stays finite (and
    // exact) however far below the max the tail lies.
    let rest: Vec<f64> = order[k..].iter().map(|&i| scaled[i]).collect();
    let m = rest.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tail = if rest.is_empty() {
        f64::NEG_INFINITY
    } else {
        m + rest.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    (ids, lps, tail - log_z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exp_matches_std() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_nonpos(x), x.exp());
            if x < -87.0 {
                assert_eq!(a, 0.0, "x={x}");
            } else {
                assert!((a - b).abs() <= 2e-7 * b, "x={x}: {a} vs {b}");
            }
            x += 0.0137;
        }
    }

    #[test]
    fn ties_lose_to_lower_ids() {
        let row = [1.0f32, 5.0, 5.0, 5.0, 0.0];
        let mut s = TopKScratch::default();
        let (mut ids, mut lp) = ([0u32; 2], [0f32; 2]);
        let tail = TopK {
            k: 2,
            inv_temperature: 1.0,
        }
        .row(&row, &mut s, &mut ids, &mut lp)
        .unwrap();
        assert_eq!(ids, [1, 2]);
        let (rids, _, rtail) = reference_topk(&row, 2, 1.0);
        assert_eq!(rids, ids);
        assert!((tail as f64 - rtail).abs() < 1e-5);
    }

    #[test]
    fn tiny_tail_keeps_precision() {
        // One dominant logit: the tail is ~e^-30 of the mass and must not vanish into rounding.
        let mut row = vec![0.0f32; 1000];
        row[7] = 30.0;
        let mut s = TopKScratch::default();
        let (mut ids, mut lp) = ([0u32; 1], [0f32; 1]);
        let tail = TopK {
            k: 1,
            inv_temperature: 1.0,
        }
        .row(&row, &mut s, &mut ids, &mut lp)
        .unwrap();
        let (_, _, rtail) = reference_topk(&row, 1, 1.0);
        // reference: ln(999) - 30 - ln(1 + 999 e^-30) ≈ -23.093
        assert!((tail as f64 - rtail).abs() < 1e-4, "{tail} vs {rtail}");
    }

    #[test]
    fn block_maxima_threshold_keeps_ties_at_the_boundary() {
        // 4096 values in 64 blocks, each block's max equal (3.0): the k-th largest block
        // maximum is itself the k-th value, tied 64 times; the lowest ids must win.
        let row: Vec<f32> = (0..4096)
            .map(|i| {
                if i % 64 == 5 {
                    3.0
                } else {
                    (i % 7) as f32 * 0.1
                }
            })
            .collect();
        let mut s = TopKScratch::default();
        let (mut ids, mut lp) = ([0u32; 10], [0f32; 10]);
        let tail = TopK {
            k: 10,
            inv_temperature: 1.0,
        }
        .row(&row, &mut s, &mut ids, &mut lp)
        .unwrap();
        let (rids, _, rtail) = reference_topk(&row, 10, 1.0);
        assert_eq!(ids.to_vec(), rids);
        assert_eq!(ids[9], 9 * 64 + 5);
        assert!((tail as f64 - rtail).abs() < 1e-5, "{tail} vs {rtail}");
    }

    #[test]
    fn tail_beyond_the_range_of_f32_exp_stays_exact() {
        // One logit 200 above the rest: every tail term is e^-200 of the max, below f32's
        // smallest number, yet the tail's log is an ordinary f32.
        let mut row = vec![0.0f32; 1000];
        row[7] = 200.0;
        row[8] = 0.5;
        let mut s = TopKScratch::default();
        let (mut ids, mut lp) = ([0u32; 1], [0f32; 1]);
        let tail = TopK {
            k: 1,
            inv_temperature: 1.0,
        }
        .row(&row, &mut s, &mut ids, &mut lp)
        .unwrap();
        let (_, _, rtail) = reference_topk(&row, 1, 1.0);
        // reference: ln(998 + e^0.5) - 200 ≈ -193.0917 (the top-1 log-prob is ~ -1e-84 ≈ 0)
        assert!((rtail - (-193.0917)).abs() < 1e-3, "{rtail}");
        assert!((tail as f64 - rtail).abs() < 1e-4, "{tail} vs {rtail}");
        assert_eq!((ids[0], lp[0]), (7, 0.0));
    }

    #[test]
    fn full_k_has_empty_tail_and_nonfinite_is_reported() {
        let row = [0.5f32, -1.0, 2.0];
        let mut s = TopKScratch::default();
        let (mut ids, mut lp) = ([0u32; 3], [0f32; 3]);
        let t = TopK {
            k: 3,
            inv_temperature: 0.5,
        };
        assert_eq!(
            t.row(&row, &mut s, &mut ids, &mut lp).unwrap(),
            f32::NEG_INFINITY
        );
        let bad = [0.0f32, f32::NAN, 1.0];
        let err = t.row(&bad, &mut s, &mut ids, &mut lp).unwrap_err();
        assert_eq!(err.index, 1);
        let bad = [0.0f32, 1.0, f32::INFINITY];
        assert_eq!(t.row(&bad, &mut s, &mut ids, &mut lp).unwrap_err().index, 2);
    }

    proptest! {
        #[test]
        fn matches_full_sort(
            // Up to 47 blocks of 64: rows long enough that the block-maxima threshold is used.
            row in prop::collection::vec(-20.0f32..20.0, 1..3000),
            k in 1usize..80,
            t in 0.25f64..4.0,
            quantise in any::<bool>(),
            peak in prop::option::of((0usize..600, 0.0f32..300.0)),
        ) {
            // Quantising creates many ties; a peak far above the rest makes tails that the
            // f32 exp cannot represent term by term.
            let mut row: Vec<f32> = if quantise { row.iter().map(|v| v.round()).collect() } else { row };
            if let Some((at, height)) = peak {
                let n = row.len();
                row[at % n] += height;
            }
            let k = k.min(row.len());
            let mut s = TopKScratch::default();
            let (mut ids, mut lp) = (vec![0u32; k], vec![0f32; k]);
            let tail = TopK { k, inv_temperature: (1.0 / t) as f32 }
                .row(&row, &mut s, &mut ids, &mut lp).unwrap();
            let (rids, rlp, rtail) = reference_topk(&row, k, t);
            prop_assert_eq!(&ids, &rids);
            for (a, b) in lp.iter().zip(&rlp) {
                prop_assert!((*a as f64 - b).abs() < 2e-5 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
            if rtail.is_finite() {
                prop_assert!((tail as f64 - rtail).abs() < 1e-4 * (1.0 + rtail.abs()), "{} vs {}", tail, rtail);
            } else {
                prop_assert!(tail == f32::NEG_INFINITY);
            }
        }
    }
}
