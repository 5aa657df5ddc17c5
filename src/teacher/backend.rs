//! The teacher backend interface: a padded batch of windows in, the top-k of every real
//! position out. The ONNX Runtime implementation is in [`super::ort_backend`].

pub use crate::device::Device;

/// Where top-k + log-softmax is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopKMode {
    /// `host` on the CPU, `onnx` on a GPU.
    Auto,
    /// Rust on the host, over the full logits.
    Host,
    /// An ONNX "top-k head" chained after the teacher with IoBinding, on the teacher's
    /// device: only k values per position leave it.
    Onnx,
}

impl TopKMode {
    /// Whether the ONNX top-k head is used on `device`.
    pub fn uses_onnx(self, device: Device) -> bool {
        match self {
            TopKMode::Auto => device != Device::Cpu,
            TopKMode::Host => false,
            TopKMode::Onnx => true,
        }
    }

    /// The name recorded in the manifest (`host` or `onnx`).
    pub fn name(self, device: Device) -> &'static str {
        if self.uses_onnx(device) {
            "onnx"
        } else {
            "host"
        }
    }
}

/// Which side padding goes on in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PaddingSide {
    Right,
    Left,
}

/// A padded batch of windows, row-major [batch, len].
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// HF convention: cumsum(mask) - 1, clipped at 0.
    pub position_ids: Vec<i64>,
    /// Real length of each window.
    pub lengths: Vec<usize>,
    pub side: PaddingSide,
    /// Each window's `seq_id` (the seed of its draws in a sampled cache); `0..batch` unless
    /// the caller sets them.
    pub seq_ids: Vec<u64>,
}

impl Batch {
    /// Pads `windows` to their longest length on `side` with `pad_id`.
    pub fn pad(windows: &[&[u32]], side: PaddingSide, pad_id: u32) -> Batch {
        let len = windows.iter().map(|w| w.len()).max().unwrap_or(0);
        let b = windows.len();
        let mut input_ids = vec![pad_id as i64; b * len];
        let mut attention_mask = vec![0i64; b * len];
        let mut position_ids = vec![0i64; b * len];
        for (i, w) in windows.iter().enumerate() {
            let start = i * len
                + match side {
                    PaddingSide::Right => 0,
                    PaddingSide::Left => len - w.len(),
                };
            for (j, &t) in w.iter().enumerate() {
                input_ids[start + j] = t as i64;
                attention_mask[start + j] = 1;
                position_ids[start + j] = j as i64;
            }
        }
        Batch {
            batch: b,
            len,
            input_ids,
            attention_mask,
            position_ids,
            lengths: windows.iter().map(|w| w.len()).collect(),
            side,
            seq_ids: (0..b as u64).collect(),
        }
    }

    /// Row (in the flattened [batch * len] positions) of window `i`'s position `p`.
    pub fn row_of(&self, i: usize, p: usize) -> usize {
        i * self.len
            + match self.side {
                PaddingSide::Right => p,
                PaddingSide::Left => self.len - self.lengths[i] + p,
            }
    }

    /// Number of real (unpadded) positions.
    pub fn real_positions(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// The top-k (and the draws, for a sampled cache) of every real position of a batch,
/// windows in batch order, positions in order.
#[derive(Debug, Clone, Default)]
pub struct BatchTopK {
    pub k: usize,
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub tail_logprob: Vec<f32>,
    /// Distinct sampled ids per position (empty without sampling).
    pub sample_lens: Vec<u32>,
    /// The sampled ids, ascending within each position.
    pub sample_ids: Vec<u32>,
    pub sample_counts: Vec<u16>,
    /// The teacher's log-prob of each sampled id (when asked for).
    pub sample_logprobs: Vec<f32>,
    /// ln p/q of each sampled id when the draws come from a proposal q ≠ p (else empty).
    pub sample_log_weights: Vec<f32>,
    /// The teacher's exact entropy (nats) at each position: NaN where not measured (see
    /// [`super::topk::entropy_measured_at`]), empty when the backend measures none.
    pub entropy: Vec<f32>,
}

/// Errors from running the teacher.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error(
        "teacher produced a non-finite logit ({value}) at window {window} of the batch, position {position}, token id {token}"
    )]
    NonFinite {
        window: usize,
        position: usize,
        token: usize,
        value: f32,
    },
    #[error("{0}")]
    Runtime(String),
}

/// A teacher model that reduces batches to their top-k.
pub trait TeacherBackend {
    /// Runs the teacher on `batch` and returns the top-k of each real position.
    fn run(&mut self, batch: &Batch) -> Result<BatchTopK, TeacherError>;
    /// Seconds spent so far in the model and in the host top-k, when measured.
    fn timing(&self) -> Option<(f64, f64)> {
        None
    }
    /// What reduced the logits (`host` or `onnx`), for the manifest.
    fn topk_name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_bad_ones_say_what_is_valid() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!("tensorrt:1".parse::<Device>().unwrap(), Device::TensorRt(1));
        assert!(
            "gpu"
                .parse::<Device>()
                .unwrap_err()
                .contains("cpu, cuda[:N] or tensorrt[:N]")
        );
        assert!(
            "cuda:x"
                .parse::<Device>()
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn padding_places_tokens_and_positions() {
        let w: [&[u32]; 2] = [&[5, 6, 7], &[9]];
        let r = Batch::pad(&w, PaddingSide::Right, 0);
        assert_eq!(r.input_ids, vec![5, 6, 7, 9, 0, 0]);
        assert_eq!(r.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(r.row_of(1, 0), 3);
        let l = Batch::pad(&w, PaddingSide::Left, 0);
        assert_eq!(l.input_ids, vec![5, 6, 7, 0, 0, 9]);
        assert_eq!(l.position_ids, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(l.row_of(1, 0), 5);
        assert_eq!(l.real_positions(), 4);
    }
}
