//! Top-k + log-softmax of one row of logits on the host, with the exact log-mass outside the
//! top-k.
//!
//! Three passes over the row:
//! 1. block maxima (blocks of 64) and a finiteness check;
//! 2. a threshold scan that keeps a small candidate buffer for the top k + 1, starting from
//!    a threshold the block maxima guarantee; blocks whose maximum is below the threshold are
//!    skipped unread, and in the rest only values above it cost a branch;
//! 3. one `exp` per value (a Cephes-style polynomial, rel. error ~1e-7), summed over the
//!    values outside the top-k relative to the largest of them (the (k+1)-th value). The tail
//!    is thus a direct sum that keeps its precision whether it is 1e-9 or 1e-200 of the mass;
//!    the partition function is the top-k's k exps (in f64) plus that tail.
//!
//! Passes 1 and 3 come in three [`Kernel`]s, chosen at run time: portable Rust (SSE2), the
//! same loops compiled for AVX2 + FMA, and AVX-512 intrinsics. All give the same ids; the
//! tests check each against a full sort.
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
    /// Packed candidates (see [`pack`]).
    cand: Vec<u64>,
    /// Maxima of the row's blocks of [`MAX_BLOCK`] values.
    block_max: Vec<f32>,
    /// The block maxima the threshold is selected from, as packed keys (reordered by the
    /// selection).
    selected: Vec<u32>,
}

/// What a top-k pass leaves behind for a hybrid cache's tail draws
/// ([`TopK::row_and_tail_blocks`], [`super::sample::Sampler::draw_tail`]): the tail's sums
/// block by block, so the draws need no second pass over the row.
#[derive(Debug, Default, Clone)]
pub struct TailBlocks {
    /// Σ exp((x − reference) · scale) over the values outside the top-k, per block of
    /// [`super::sample::BLOCK`] ids (0 for a block the top-k fills).
    pub sums: Vec<f64>,
    /// The largest value outside the top-k: every tail value is at most this, and every
    /// top-k value above it (unless `ties`).
    pub reference: f32,
    /// The row's maximum.
    pub max: f32,
    /// ln Σ exp((x − max) · scale) over the whole row.
    pub log_z: f64,
    /// Values equal to the k-th lie outside the top-k too (they tie with it and lose on
    /// id): then a value equal to `reference` may be in either, and the sums miss them.
    pub ties: bool,
}

/// The reduction's parameters.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    pub k: usize,
    /// 1 / temperature (> 0).
    pub inv_temperature: f32,
}

/// A candidate (value, id) packed so that ascending `u64` order is descending value, then
/// ascending id: selecting and sorting then compare plain integers. The value's key is its
/// bits made order-preserving (sign flipped for positives, all bits for negatives); -0.0 is
/// made +0.0 first, so the two zeros tie as `f32` comparison says.
#[inline(always)]
fn pack(x: f32, id: u32) -> u64 {
    let b = (x + 0.0).to_bits();
    let key = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    ((!key as u64) << 32) | id as u64
}

#[inline(always)]
fn unpack(c: u64) -> (f32, u32) {
    let key = !((c >> 32) as u32);
    let b = if key >> 31 == 1 {
        key & 0x7fff_ffff
    } else {
        !key
    };
    (f32::from_bits(b), c as u32)
}

/// exp(x) for x <= 0, vectorisable (Cephes `expf` polynomial, magic-number rounding).
/// Below -87 (e^-87 ≈ 1.6e-38, the end of normal f32) it returns 0: such terms change a
/// partition function of at least 1 by less than 1e-33.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
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

/// The entropy (nats) of softmax(`row` · `scale`) given the row's maximum: ln Z − Σ e·y / Z
/// with y = (x − max) · scale ≤ 0 and e = exp(y) (the polynomial above, in 8 lanes so the
/// pass vectorises; partial sums in f64 every 64 values).
pub(crate) fn entropy_of(row: &[f32], max: f32, scale: f32) -> f64 {
    let (mut z, mut ey) = (0f64, 0f64);
    let (mut ws, mut ys) = ([0f32; 64], [0f32; 64]);
    for block in row.chunks(64) {
        // The sampler's loop shape (zip over fixed arrays), which vectorises.
        for ((w, y), &x) in ws.iter_mut().zip(ys.iter_mut()).zip(block) {
            let t = ((x - max) * scale).min(0.0);
            *y = t;
            *w = exp_nonpos(t);
        }
        let n = block.len();
        ws[n..].fill(0.0);
        ys[n..].fill(0.0);
        let (mut zs, mut eys) = ([0f32; 8], [0f32; 8]);
        for (wc, yc) in ws.chunks_exact(8).zip(ys.chunks_exact(8)) {
            for j in 0..8 {
                zs[j] += wc[j];
                eys[j] += wc[j] * yc[j];
            }
        }
        z += zs.iter().map(|&v| v as f64).sum::<f64>();
        ey += eys.iter().map(|&v| v as f64).sum::<f64>();
    }
    z.ln() - ey / z
}

/// Whether the teacher stage measures the entropy at position `pos` of window `seq_id`: one
/// position in [`ENTROPY_STRIDE`], on diagonals (`(seq_id + pos) % stride == 0`) so every
/// position index is represented. Measured: a full pass costs 3.4x the top-64 per row at
/// V = 32000 (`benches/topk.rs`, `sample_vs_topk/*/entropy`), so a pass on every row would
/// more than triple the host's reduction time; one row in 16 adds ~20 %.
pub fn entropy_measured_at(seq_id: u64, pos: u64) -> bool {
    seq_id.wrapping_add(pos).is_multiple_of(ENTROPY_STRIDE)
}

/// One position in this many has its entropy measured ([`entropy_measured_at`]).
pub const ENTROPY_STRIDE: u64 = 16;

/// The entropy (nats) of softmax(`row` · `scale`): what the teacher stage records at the
/// positions of [`entropy_measured_at`] (two vectorised passes: the maximum, then
/// [`entropy_of`]).
pub fn row_entropy(row: &[f32], scale: f32) -> f64 {
    entropy_of(row, max_of(row), scale)
}

/// The largest of `v` (-inf if empty), in 8 independent lanes so it vectorises.
#[inline(always)]
pub(crate) fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Values per block of pass 1's block maxima.
const MAX_BLOCK: usize = 64;

/// The maxima of the row's blocks of [`MAX_BLOCK`] values (into `block_max`) and a poison
/// sum (NaN iff the row holds a NaN or an infinity), in 8 independent lanes so the loop
/// vectorises.
#[inline(always)]
fn block_max_and_poison(row: &[f32], block_max: &mut Vec<f32>) -> f32 {
    // Sized first and written through a slice: pushing would store and reload the vector's
    // length every block.
    block_max.clear();
    block_max.resize(row.len().div_ceil(MAX_BLOCK), 0.0);
    let mut poison = [0.0f32; 8];
    for (block, out) in row.chunks(MAX_BLOCK).zip(block_max.iter_mut()) {
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
        *out = max_of(&max);
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

/// AVX-512 versions written with intrinsics: 16 lanes, mask registers for the "below the
/// k-th" test and the row's end, and `vscalefps` for the 2^n of the exp (no integer
/// tricks). On CPUs with full-width AVX-512 units (AMD Zen 5, Intel server cores) they do
/// twice the work per instruction of the AVX2 loops.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::MAX_BLOCK;
    use std::arch::x86_64::*;

    /// exp(t) for t in [-150, 0]: n = round(t log2 e), r = t - n ln 2 in [-ln2/2, ln2/2]
    /// (ln 2 split in two, as in `exp_nonpos`, so r keeps t's precision), e^r by a degree-5
    /// polynomial with its constant fixed at 1 (least-maximum relative error on that
    /// interval: 9.5e-8 with these f32 coefficients), times 2^n by `vscalefps`. Below
    /// t = -87 the result is subnormal or 0 (the portable `exp_nonpos` cuts at -87 instead):
    /// such terms are at most e^-87 ≈ 1.65e-38 of a sum that is at least 1. 10 instructions.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_nonpos(t: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(t, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), t);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(8.290_315e-3);
        for c in [
            4.189_793e-2,
            1.666_763_6e-1,
            4.999_915e-1,
            9.999_997e-1,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_nonpos_for_tests(t: __m512) -> __m512 {
        exp_nonpos(t)
    }

    /// Adds exp((x - reference) * scale) of the lanes of `x` selected by `valid` that are
    /// below `kth` (for those, x <= reference). The argument is clamped at -150 (an exp of 0
    /// there, and no NaN from an infinite product); lanes at or above `kth` may compute a
    /// large or infinite power: they are masked out of the sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add_exp_below(
        acc: __m512,
        x: __m512,
        valid: __mmask16,
        reference: __m512,
        scale: __m512,
        kth: __m512,
    ) -> __m512 {
        let t = _mm512_max_ps(
            _mm512_mul_ps(_mm512_sub_ps(x, reference), scale),
            _mm512_set1_ps(-150.0),
        );
        let below = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(valid, x, kth);
        _mm512_mask_add_ps(acc, below, acc, exp_nonpos(t))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_sum_below(row: &[f32], reference: f32, scale: f32, kth: f32) -> f64 {
        let (vr, vs, vk) = (
            _mm512_set1_ps(reference),
            _mm512_set1_ps(scale),
            _mm512_set1_ps(kth),
        );
        let mut total = 0.0f64;
        // f32 lanes summed per chunk of 1024 values, chunks summed in f64 (as the portable
        // loop does).
        for chunk in row.chunks(1024) {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut quads = chunk.chunks_exact(64);
            for q in &mut quads {
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: q holds 64 values, so lanes 16·j .. 16·j + 16 are in bounds.
                    let x = unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * j)) };
                    *a = add_exp_below(*a, x, 0xffff, vr, vs, vk);
                }
            }
            for c in quads.remainder().chunks(16) {
                let valid: __mmask16 = ((1u32 << c.len()) - 1) as u16;
                // SAFETY: the masked load reads only the c.len() lanes that are in bounds.
                let x = unsafe { _mm512_maskz_loadu_ps(valid, c.as_ptr()) };
                acc[0] = add_exp_below(acc[0], x, valid, vr, vs, vk);
            }
            let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            total += _mm512_reduce_add_ps(s) as f64;
        }
        total
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn block_max_and_poison(row: &[f32], block_max: &mut Vec<f32>) -> f32 {
        // Sized first and written through a slice: pushing would store and reload the
        // vector's length every block (it may alias the stores, for all the compiler knows).
        block_max.clear();
        block_max.resize(row.len().div_ceil(MAX_BLOCK), 0.0);
        let zero = _mm512_setzero_ps();
        // One poison accumulator per load: a single one would chain four dependent FMAs
        // per block, and that chain, not the loads, would set the pace.
        let mut poison = [zero; 4];
        let mut blocks = row.chunks_exact(MAX_BLOCK);
        for (b, out) in (&mut blocks).zip(block_max.iter_mut()) {
            // SAFETY: a block holds 64 values: four loads of 16 stay in bounds.
            let x = unsafe {
                let p = b.as_ptr();
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ]
            };
            // x * 0 is NaN exactly for NaN and +-inf.
            for (p, v) in poison.iter_mut().zip(x) {
                *p = _mm512_fmadd_ps(v, zero, *p);
            }
            let m = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
            *out = _mm512_reduce_max_ps(m);
        }
        let mut p = _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(poison[0], poison[1]),
            _mm512_add_ps(poison[2], poison[3]),
        ));
        let rest = blocks.remainder();
        if !rest.is_empty() {
            *block_max.last_mut().expect("a block for the rest") = super::max_of(rest);
            p += rest.iter().map(|x| x * 0.0).sum::<f32>();
        }
        p
    }
}

/// Which compiled version of the vectorised passes runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, vectorised by the compiler for the build target (SSE2 on x86-64).
    Portable,
    /// The same loops compiled for AVX2 + FMA.
    Avx2,
    /// AVX-512F intrinsics.
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Kernel::available()
                .last()
                .copied()
                .unwrap_or(Kernel::Portable)
        })
    }

    /// Every kernel this CPU runs, slowest first (for tests and benchmarks).
    pub fn available() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU has the kernel's instructions (the one place they are detected).
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    fn block_max(self, row: &[f32], block_max: &mut Vec<f32>) -> f32 {
        match self {
            // SAFETY: `runs_here` checked that the CPU has the kernel's features; a kernel it
            // does not run falls back to the portable loop.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if self.runs_here() => unsafe {
                block_max_and_poison_avx2(row, block_max)
            },
            // SAFETY: as above (AVX-512F checked by `runs_here`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if self.runs_here() => unsafe {
                avx512::block_max_and_poison(row, block_max)
            },
            _ => block_max_and_poison(row, block_max),
        }
    }

    /// Σ exp((x − reference) · scale) over the row's values `x` (clamped at exp(0) above
    /// `reference`), vectorised: the building block of the sampler's block sums.
    pub(crate) fn exp_sum_all(self, row: &[f32], reference: f32, scale: f32) -> f64 {
        self.exp_sum(row, reference, scale, f32::INFINITY)
    }

    fn exp_sum(self, row: &[f32], reference: f32, scale: f32, kth: f32) -> f64 {
        match self {
            // SAFETY: as in `block_max`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if self.runs_here() => unsafe {
                exp_sum_below_avx2(row, reference, scale, kth)
            },
            // SAFETY: as in `block_max`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if self.runs_here() => unsafe {
                avx512::exp_sum_below(row, reference, scale, kth)
            },
            _ => exp_sum_below(row, reference, scale, kth),
        }
    }
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
        self.row_with(Kernel::best(), row, scratch, ids, logprobs)
    }

    /// [`TopK::row`] with a chosen kernel (every kernel gives the same ids; log-probs agree
    /// to f32 rounding).
    pub fn row_with(
        &self,
        kernel: Kernel,
        row: &[f32],
        scratch: &mut TopKScratch,
        ids: &mut [u32],
        logprobs: &mut [f32],
    ) -> Result<f32, NonFinite> {
        self.reduce(kernel, row, scratch, ids, logprobs, None)
    }

    /// [`TopK::row`] that also leaves the tail's block sums in `tail` (pass 3 sums block
    /// by block instead of the whole row at once), for a hybrid's draws from the tail. The
    /// result is that of [`TopK::row`] up to the rounding of the tail's sum.
    pub fn row_and_tail_blocks(
        &self,
        row: &[f32],
        scratch: &mut TopKScratch,
        ids: &mut [u32],
        logprobs: &mut [f32],
        tail: &mut TailBlocks,
    ) -> Result<f32, NonFinite> {
        self.reduce(Kernel::best(), row, scratch, ids, logprobs, Some(tail))
    }

    fn reduce(
        &self,
        kernel: Kernel,
        row: &[f32],
        scratch: &mut TopKScratch,
        ids: &mut [u32],
        logprobs: &mut [f32],
        mut tail: Option<&mut TailBlocks>,
    ) -> Result<f32, NonFinite> {
        let k = self.k;
        assert!(
            k >= 1 && k <= row.len() && ids.len() == k && logprobs.len() == k,
            "top-k arguments checked by the caller: this is a bug"
        );
        let TopKScratch {
            cand,
            block_max,
            selected,
        } = scratch;
        // Pass 1: block maxima and finiteness (x * 0 is NaN exactly for NaN and +-inf).
        let poison = kernel.block_max(row, block_max);
        let max = max_of(block_max);
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
        cand.clear();
        let cap = (2 * keep).max(keep + 32);
        // Start from the keep-th largest block maximum m (of the first 16·keep blocks, which
        // bounds the cost of finding it): those keep maxima are distinct values >= m, so
        // every one of the keep best is >= m too. Only values >= m are scanned in (a few
        // times keep instead of ~keep·ln(row / keep) pushes and sorts).
        // The maxima are compared as packed keys (plain integers, ascending = descending
        // value), not through `partial_cmp`.
        selected.clear();
        selected.extend(
            block_max[..block_max.len().min(16 * keep)]
                .iter()
                .map(|&m| (pack(m, 0) >> 32) as u32),
        );
        let mut thr = if selected.len() > keep {
            let (_, m, _) = selected.select_nth_unstable(keep - 1);
            unpack((*m as u64) << 32).0.next_down()
        } else {
            f32::NEG_INFINITY
        };
        let push = |cand: &mut Vec<u64>, thr: &mut f32, i: usize, x: f32| {
            if x > *thr {
                cand.push(pack(x, i as u32));
                if cand.len() == cap {
                    cand.select_nth_unstable(keep - 1);
                    cand.truncate(keep);
                    *thr = unpack(cand[keep - 1]).0;
                }
            }
        };
        // A block whose maximum is not above the threshold holds nothing to push: skipped
        // unread. In the others, each run of 16 is compared at once into a bit mask, so
        // only the values above the threshold cost a branch.
        const RUN: usize = 16;
        for (b, &bmax) in block_max.iter().enumerate() {
            if bmax <= thr {
                continue;
            }
            let start = b * MAX_BLOCK;
            let block = &row[start..(start + MAX_BLOCK).min(row.len())];
            for (r, c) in block.chunks(RUN).enumerate() {
                // The run's values above the threshold as a bit mask, visited bit by bit
                // (`push` tests each again: the threshold may rise on the way).
                let mut above = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |m, (j, &x)| m | (((x > thr) as u32) << j));
                while above != 0 {
                    let j = above.trailing_zeros() as usize;
                    above &= above - 1;
                    push(cand, &mut thr, start + r * RUN + j, c[j]);
                }
            }
        }
        if cand.len() > keep {
            cand.select_nth_unstable(keep - 1);
            cand.truncate(keep);
        }
        cand.sort_unstable();
        let value = |j: usize| unpack(cand[j]).0;
        let scale = self.inv_temperature;
        // The top-k's scaled logits relative to the max (the first is 0).
        let top = |j: usize| ((value(j) - max) * scale) as f64;
        let top_sum: f64 = (0..k).map(|j| top(j).exp()).sum();
        let log_tail = if keep == k {
            f64::NEG_INFINITY
        } else {
            // Pass 3: the tail as a direct sum of exp(x - r) over the values outside the
            // top-k, r the largest of them: every term is at most 1 and r's own is 1, so the
            // sum never underflows, however peaked the row (a tail of e^-200 stays exact).
            let kth = value(k - 1);
            let r = value(k);
            let below = match tail.as_deref_mut() {
                Some(t) => {
                    t.sums.clear();
                    t.sums.extend(
                        row.chunks(super::sample::BLOCK)
                            .map(|b| kernel.exp_sum(b, r, scale, kth)),
                    );
                    t.reference = r;
                    t.sums.iter().sum()
                }
                None => kernel.exp_sum(row, r, scale, kth),
            };
            // Values equal to the k-th but not chosen (higher ids) are outside the top-k
            // too; there are some only when r ties with the k-th, and each weighs exp(0).
            let ties_out = if r == kth {
                row.iter().filter(|&&x| x == kth).count()
                    - (0..k).filter(|&j| value(j) == kth).count()
            } else {
                0
            };
            if let Some(t) = tail.as_deref_mut() {
                t.ties = ties_out > 0;
            }
            ((r - max) * scale) as f64 + (below + ties_out as f64).ln()
        };
        // log Z relative to the max: top_sum >= 1, and log_tail <= ln(row length).
        let log_z = (top_sum + log_tail.exp()).ln();
        if let Some(t) = tail {
            if keep == k {
                // The top-k is the whole row: no tail to draw from.
                t.sums.clear();
                t.reference = f32::NEG_INFINITY;
                t.ties = false;
            }
            t.max = max;
            t.log_z = log_z;
        }
        for (j, &c) in cand[..k].iter().enumerate() {
            ids[j] = unpack(c).1;
            logprobs[j] = (top(j) - log_z) as f32;
        }
        Ok((log_tail - log_z) as f32)
    }
}

/// The same reduction by a full sort in f64: the independent reference the tests compare with
/// (not part of the public API).
#[doc(hidden)]
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
    fn entropy_matches_a_direct_sum() {
        let mut r = crate::rng::SplitMix::new(9);
        for (n, scale) in [
            (1usize, 1.0f32),
            (7, 1.0),
            (64, 0.5),
            (1000, 1.0),
            (2051, 2.0),
        ] {
            let row: Vec<f32> = (0..n).map(|_| r.next_f32() * 12.0 - 6.0).collect();
            let m = max_of(&row);
            let e: Vec<f64> = row
                .iter()
                .map(|&x| (((x - m) * scale) as f64).exp())
                .collect();
            let z: f64 = e.iter().sum();
            let h: f64 = -e
                .iter()
                .map(|&v| v / z)
                .filter(|&p| p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>();
            let got = entropy_of(&row, m, scale);
            assert!((got - h).abs() < 1e-5 * h.max(1.0), "n {n}: {got} vs {h}");
        }
        // A point mass has no entropy.
        assert!(entropy_of(&[0.0, -200.0, -300.0], 0.0, 1.0).abs() < 1e-12);
    }

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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_matches_std() {
        if !Kernel::available().contains(&Kernel::Avx512) {
            return;
        }
        use std::arch::x86_64::*;
        // t from -87 (the end of normal f32) to 0, and a stretch below to the clamp at -150,
        // where the result must be tiny (subnormal or 0), never garbage.
        let ts: Vec<f32> = (0..15000)
            .map(|i| -150.0 + i as f32 * (150.0 / 15000.0))
            .chain([0.0, -1e-30, -0.346_573_6, 0.346_573_6 - 1.0])
            .collect();
        for c in ts.chunks(16) {
            let mut input = [0f32; 16];
            input[..c.len()].copy_from_slice(c);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F is present (checked above); the arrays hold 16 values.
            unsafe {
                let e = avx512::exp_nonpos_for_tests(_mm512_loadu_ps(input.as_ptr()));
                _mm512_storeu_ps(out.as_mut_ptr(), e);
            }
            for (&t, &a) in c.iter().zip(&out) {
                let b = (t as f64).exp();
                if t >= -87.0 {
                    assert!((a as f64 - b).abs() <= 2e-7 * b, "t={t}: {a} vs {b}");
                } else {
                    // At most e^-87 ≈ 1.65e-38, as the sum's terms are dropped there.
                    assert!((0.0..=1.7e-38).contains(&a), "t={t}: {a}");
                }
            }
        }
    }

    #[test]
    fn kernels_agree_on_sums_and_maxima() {
        // Rows with a NaN or an infinity are caught by every kernel's pass 1; the exp sums
        // agree with the portable loop to f32 rounding, including rows that end mid-vector.
        for len in [1usize, 15, 16, 17, 63, 64, 65, 1000, 1024, 1025, 3000] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7)
                .collect();
            let mut want_max = Vec::new();
            let want_p = block_max_and_poison(&row, &mut want_max);
            // As the top-k calls it: the reference is the largest value below the k-th, so
            // the sum is at least 1 (terms below e^-87, where the kernels may differ, are
            // then immaterial).
            let kth = row[len / 2];
            let reference = row
                .iter()
                .cloned()
                .filter(|&x| x < kth)
                .fold(-35.0, f32::max);
            let want = exp_sum_below(&row, reference, 1.3, kth);
            for kernel in Kernel::available() {
                let mut got_max = Vec::new();
                assert_eq!(
                    kernel.block_max(&row, &mut got_max),
                    want_p,
                    "{kernel:?} {len}"
                );
                assert_eq!(got_max, want_max, "{kernel:?} {len}");
                let got = kernel.exp_sum(&row, reference, 1.3, kth);
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "{kernel:?} {len}: {got} vs {want}"
                );
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut r = row.clone();
                    r[len - 1] = bad;
                    assert!(
                        kernel.block_max(&r, &mut got_max).is_nan(),
                        "{kernel:?} {len} {bad}"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_candidates_order_as_value_then_id() {
        let vals = [
            -f32::MAX,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            2.0,
            f32::MAX,
        ];
        let mut c: Vec<u64> = vals
            .iter()
            .enumerate()
            .map(|(i, &x)| pack(x, i as u32))
            .collect();
        c.reverse();
        c.sort_unstable();
        let got: Vec<(f32, u32)> = c.iter().map(|&c| unpack(c)).collect();
        // Descending value; equal values (2.0, and the two zeros) by ascending id.
        let ids: Vec<u32> = got.iter().map(|g| g.1).collect();
        assert_eq!(ids, [8, 6, 7, 5, 3, 4, 2, 1, 0]);
        for (x, id) in got {
            assert_eq!(x, vals[id as usize]);
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
            let (rids, rlp, rtail) = reference_topk(&row, k, t);
            // Every kernel this CPU runs, each against the reference.
            for kernel in Kernel::available() {
                let mut s = TopKScratch::default();
                let (mut ids, mut lp) = (vec![0u32; k], vec![0f32; k]);
                let tail = TopK { k, inv_temperature: (1.0 / t) as f32 }
                    .row_with(kernel, &row, &mut s, &mut ids, &mut lp).unwrap();
                prop_assert_eq!(&ids, &rids, "{:?}", kernel);
                for (a, b) in lp.iter().zip(&rlp) {
                    prop_assert!((*a as f64 - b).abs() < 2e-5 * (1.0 + b.abs()), "{:?}: {} vs {}", kernel, a, b);
                }
                if rtail.is_finite() {
                    prop_assert!((tail as f64 - rtail).abs() < 1e-4 * (1.0 + rtail.abs()), "{:?}: {} vs {}", kernel, tail, rtail);
                } else {
                    prop_assert!(tail == f32::NEG_INFINITY, "{:?}", kernel);
                }
            }
        }
    }
}
