//! A cache batch as tensors: [`TrainBatch`] (flat `Vec`s from the stream) to the student's
//! inputs (`input_ids`, `attention_mask` `[batch, len]`) and the loss's [`Targets`]
//! (positions flattened to `[batch × len]`).
//!
//! ```
//! use burn::backend::Flex;
//! use logitcache::cache::stream::TrainBatch;
//! use logitcache::student::data::{inputs, targets};
//! let b = TrainBatch {
//!     batch: 1, len: 2, k: 1,
//!     input_ids: vec![5, 6], target_ids: vec![6, 0], target_mask: vec![1.0, 0.0],
//!     mask: vec![1.0, 1.0], topk_ids: vec![6, 7], topk_logprobs: vec![-0.1, -0.2],
//!     tail_logprob: vec![-2.0, -2.0],
//!     ..Default::default()
//! };
//! let (ids, mask) = inputs::<Flex>(&b, &Default::default());
//! assert_eq!((ids.dims(), mask.dims()), ([1, 2], [1, 2]));
//! assert_eq!(targets::<Flex>(&b, &Default::default()).topk_ids.dims(), [2, 1]);
//! ```

use crate::cache::stream::TrainBatch;
use crate::loss::Targets;
use burn::prelude::*;

/// The teacher side of `b` (and the next-token targets), flattened to positions.
pub fn targets<B: Backend>(b: &TrainBatch, dev: &B::Device) -> Targets<B> {
    let n = b.batch * b.len;
    let int1 = |v: &[u32]| {
        Tensor::<B, 1, Int>::from_data(
            TensorData::new(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), [v.len()]),
            dev,
        )
    };
    let f1 = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev);
    Targets {
        topk_ids: int1(&b.topk_ids).reshape([n, b.k]),
        topk_logprobs: f1(&b.topk_logprobs).reshape([n, b.k]),
        tail_logprob: f1(&b.tail_logprob),
        mask: f1(&b.mask),
        target_ids: int1(&b.target_ids),
        target_mask: f1(&b.target_mask),
    }
}

/// The student's inputs of `b`: token ids and attention mask, `[batch, len]`.
pub fn inputs<B: Backend>(b: &TrainBatch, dev: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let ids = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            b.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            [b.input_ids.len()],
        ),
        dev,
    )
    .reshape([b.batch, b.len]);
    let mask = Tensor::<B, 1>::from_data(TensorData::new(b.mask.clone(), [b.mask.len()]), dev)
        .reshape([b.batch, b.len]);
    (ids, mask)
}
