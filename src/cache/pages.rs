//! The fast path of the training reader: the two top-k columns decoded straight from their
//! Parquet pages.
//!
//! `topk_ids` and `topk_logprobs` carry `k` values per position, so they are almost all of
//! a shard. They are `list<fixed_size_list<…, k>>` with no nulls and no empty lists: every
//! definition level is the maximum, and the repetition levels only restate what the
//! per-position count (`input_ids`) and `k` already say. arrow-rs's generic nested-list
//! readers still decode two levels per value and rebuild the nesting; here the level blocks
//! are checked (definition levels: one RLE run of the maximum) and skipped, and the values
//! are copied out of PLAIN or BYTE_STREAM_SPLIT pages.
//!
//! The sample columns (`sample_ids`, `sample_counts`: `list<list<…>>`, one list per
//! position, BYTE_STREAM_SPLIT) have lists of varying length, so their repetition levels
//! carry information: they are decoded here (an RLE/bit-packed hybrid decoder) beside the
//! values, and each position's length is read off the levels, without building the nested
//! Arrow arrays. Sample columns in another encoding (DELTA_BINARY_PACKED, written before
//! 2026-12-04) go through the parquet crate's column reader instead, the same way.
//!
//! Anything else (a dictionary page, another encoding, a bit-packed definition run, counts
//! that do not add up, an empty or null list) returns `None`, and the caller decodes the row
//! group with the generic Arrow reader instead: the fast path never guesses.

use bytes::Bytes;
use half::f16;
use parquet::basic::{Encoding, Type as PhysicalType};
use parquet::column::page::{Page, PageReader};
use parquet::column::reader::ColumnReaderImpl;
use parquet::data_type::DataType;
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::serialized_reader::SerializedPageReader;
use std::sync::Arc;

/// Values of one leaf column chunk, decoded from its pages: `Ok(None)` when the chunk is
/// not in the layout this fast path handles, `Err` when the bytes themselves are broken.
/// The values go into `reuse`'s buffer (cleared first; pass `Vec::new()` for a new one),
/// which is consumed either way (dropped on `Ok(None)` or `Err`).
pub(crate) fn leaf_values<T: Leaf>(
    file: &Bytes,
    chunk: &ColumnChunkMetaData,
    rows: usize,
    expected: usize,
    reuse: Vec<T>,
) -> Result<Option<Vec<T>>, String> {
    page_values(file, chunk, rows, expected, None, reuse)
}

/// [`leaf_values`], also decoding the repetition levels into `reps` when given (a leaf whose
/// lists vary in length); without, they are skipped.
fn page_values<T: Leaf>(
    file: &Bytes,
    chunk: &ColumnChunkMetaData,
    rows: usize,
    expected: usize,
    mut reps: Option<&mut Vec<u8>>,
    reuse: Vec<T>,
) -> Result<Option<Vec<T>>, String> {
    let desc = chunk.column_descr();
    if chunk.column_type() != T::PHYSICAL
        || (T::PHYSICAL == PhysicalType::FIXED_LEN_BYTE_ARRAY
            && desc.type_length() as usize != T::WIDTH)
    {
        return Ok(None);
    }
    let (max_def, max_rep) = (desc.max_def_level(), desc.max_rep_level());
    let mut pages = SerializedPageReader::new(Arc::new(file.clone()), chunk, rows, None)
        .map_err(|e| e.to_string())?;
    // (A buffer too small is replaced, not grown: growing would copy its stale values.)
    let mut out = if reuse.capacity() < expected {
        Vec::with_capacity(expected)
    } else {
        let mut v = reuse;
        v.clear();
        v
    };
    while let Some(page) = pages.get_next_page().map_err(|e| e.to_string())? {
        let (values, n, encoding) = match &page {
            Page::DataPage {
                buf,
                num_values,
                encoding,
                def_level_encoding,
                rep_level_encoding,
                ..
            } => {
                if (max_rep > 0 && *rep_level_encoding != Encoding::RLE)
                    || (max_def > 0 && *def_level_encoding != Encoding::RLE)
                {
                    return Ok(None);
                }
                let n = *num_values as usize;
                let mut at = 0usize;
                if max_rep > 0 {
                    let (start, end) = prefixed(buf, at)?;
                    if let Some(reps) = reps.as_deref_mut()
                        && !decode_levels(&buf[start..end], max_rep, n, reps)
                    {
                        return Ok(None);
                    }
                    at = end;
                }
                if max_def > 0 {
                    let (levels, end) = prefixed(buf, at)?;
                    if !all_max(&buf[levels..end], max_def, n) {
                        return Ok(None);
                    }
                    at = end;
                }
                (&buf[at..], n, *encoding)
            }
            Page::DataPageV2 {
                buf,
                num_values,
                encoding,
                num_nulls,
                def_levels_byte_len,
                rep_levels_byte_len,
                ..
            } => {
                let n = *num_values as usize;
                let (r, d) = (*rep_levels_byte_len as usize, *def_levels_byte_len as usize);
                if *num_nulls != 0 || r + d > buf.len() {
                    return Ok(None);
                }
                if max_def > 0 && !all_max(&buf[r..r + d], max_def, n) {
                    return Ok(None);
                }
                if let Some(reps) = reps.as_deref_mut()
                    && (max_rep == 0 || !decode_levels(&buf[..r], max_rep, n, reps))
                {
                    return Ok(None);
                }
                (&buf[r + d..], n, *encoding)
            }
            Page::DictionaryPage { .. } => return Ok(None),
        };
        if out.len() + n > expected || values.len() != n * T::WIDTH {
            return Ok(None);
        }
        match encoding {
            Encoding::PLAIN => out.extend(values.chunks_exact(T::WIDTH).map(T::from_le)),
            Encoding::BYTE_STREAM_SPLIT => unsplit(values, n, &mut out),
            _ => return Ok(None),
        }
    }
    Ok((out.len() == expected).then_some(out))
}

/// The values of a `list<list<…>>` leaf column chunk stored PLAIN or BYTE_STREAM_SPLIT
/// (the sample columns), and the offsets of its inner lists, decoded straight from the
/// pages: the repetition levels by the RLE/bit-packed hybrid decoder below, the values as
/// [`leaf_values`] copies them. `Ok(None)` for anything else (another encoding or nesting, a
/// null or empty list): [`nested_values`] then decodes the chunk with the parquet crate's
/// column reader.
pub(crate) fn nested_leaf_values<T: Leaf>(
    file: &Bytes,
    chunk: &ColumnChunkMetaData,
    rows: usize,
) -> Result<Option<NestedValues<T>>, String> {
    if chunk.column_descr().max_rep_level() != 2 {
        return Ok(None);
    }
    let n = chunk.num_values().max(0) as usize;
    let mut reps: Vec<u8> = Vec::with_capacity(n);
    let Some(values) = page_values::<T>(file, chunk, rows, n, Some(&mut reps), Vec::new())? else {
        return Ok(None);
    };
    if reps.len() != values.len() || reps.iter().filter(|&&r| r == 0).count() != rows {
        return Ok(None);
    }
    Ok(offsets_from_reps(&reps).map(|o| (values, o)))
}

/// The offsets of the inner lists of a `list<list<…>>` leaf from its repetition levels, one
/// per value (every list present and non-empty): level 0 starts a row (and its first
/// position), 1 a position, 2 continues the position's list. `None` when the first level
/// does not start a row.
fn offsets_from_reps<R: Copy + Into<i16>>(reps: &[R]) -> Option<Vec<i32>> {
    if reps.first().is_some_and(|&r| r.into() != 0) {
        return None;
    }
    let mut offsets: Vec<i32> = Vec::with_capacity(reps.len() / 4 + 2);
    offsets.push(0);
    for (i, &r) in reps.iter().enumerate().skip(1) {
        if r.into() < 2 {
            offsets.push(i as i32);
        }
    }
    if !reps.is_empty() {
        offsets.push(reps.len() as i32);
    }
    Some(offsets)
}

/// Appends `n` levels (at most `max`) decoded from the RLE/bit-packed hybrid `levels` to
/// `out`; false when the bytes do not hold them (or a level is above `max`).
fn decode_levels(levels: &[u8], max: i16, n: usize, out: &mut Vec<u8>) -> bool {
    let bits = 16 - (max as u16).leading_zeros() as usize;
    if bits == 0 || bits > 8 {
        return false;
    }
    let width = bits.div_ceil(8);
    let target = out.len() + n;
    let mask = (1u16 << bits) - 1;
    let mut at = 0usize;
    while out.len() < target {
        let Some(header) = run_header(levels, &mut at) else {
            return false;
        };
        let count = (header >> 1) as usize;
        if header & 1 == 0 {
            // An RLE run: `count` copies of one value (`width` bytes, little-endian).
            let Some(v) = levels.get(at..at + width) else {
                return false;
            };
            at += width;
            let value = v[0];
            if count > target - out.len() || i16::from(value) > max {
                return false;
            }
            out.resize(out.len() + count, value);
        } else {
            // `count` groups of 8 values, `bits` bits each, packed from the lowest bit;
            // the last group may pad past the page's levels.
            let Some(end) = count.checked_mul(bits).and_then(|l| l.checked_add(at)) else {
                return false;
            };
            let Some(packed) = levels.get(at..end) else {
                return false;
            };
            at = end;
            let take = (count * 8).min(target - out.len());
            let start = out.len();
            if bits == 2 {
                // The repetition levels of list<list<…>>: four per byte.
                for &b in &packed[..take.div_ceil(4)] {
                    out.extend_from_slice(&[b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6]);
                }
                out.truncate(start + take);
            } else {
                for v in 0..take {
                    let bit = v * bits;
                    let lo = u16::from(packed[bit / 8])
                        | packed.get(bit / 8 + 1).map_or(0, |&b| u16::from(b) << 8);
                    out.push(((lo >> (bit % 8)) & mask) as u8);
                }
            }
            if out[start..].iter().any(|&l| i16::from(l) > max) {
                return false;
            }
        }
    }
    true
}

/// A nested leaf's values and the offsets of its inner lists (inner list p is
/// `values[offsets[p]..offsets[p + 1]]`; `offsets[0] == 0`).
pub(crate) type NestedValues<T> = (Vec<T>, Vec<i32>);

/// The values of a `list<list<T>>` leaf column chunk (one inner list per position) and the
/// offsets of its inner lists: `Ok(None)` when the chunk is not in the layout this fast path
/// handles (another type or nesting, or a null or empty list: definition levels below the
/// maximum), `Err` when the bytes themselves are broken.
pub(crate) fn nested_values<T: DataType>(
    file: &Bytes,
    chunk: &ColumnChunkMetaData,
    rows: usize,
) -> Result<Option<NestedValues<T::T>>, String> {
    let desc = chunk.column_descr_ptr();
    if desc.physical_type() != T::get_physical_type() || desc.max_rep_level() != 2 {
        return Ok(None);
    }
    let max_def = desc.max_def_level();
    let pages = SerializedPageReader::new(Arc::new(file.clone()), chunk, rows, None)
        .map_err(|e| e.to_string())?;
    let mut reader = ColumnReaderImpl::<T>::new(desc, Box::new(pages));
    let n = chunk.num_values().max(0) as usize;
    let (mut def, mut reps, mut values) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut got = 0;
    while got < rows {
        let (r, _, _) = reader
            .read_records(rows - got, Some(&mut def), Some(&mut reps), &mut values)
            .map_err(|e| e.to_string())?;
        if r == 0 {
            return Err(format!(
                "the column chunk ends after {got} of its {rows} rows"
            ));
        }
        got += r;
    }
    if def.len() != values.len() || def.iter().any(|&d| d != max_def) {
        return Ok(None);
    }
    // With every list present and non-empty, one repetition level per value.
    Ok(offsets_from_reps(&reps).map(|o| (values, o)))
}

/// A `u32` length prefix at `at` (levels of a v1 data page): the block's `(start, end)`.
fn prefixed(buf: &[u8], at: usize) -> Result<(usize, usize), String> {
    let len = buf
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("a data page ends inside its level block")?;
    let end = at + 4 + len;
    if end > buf.len() {
        return Err("a data page's level block runs past the page".into());
    }
    Ok((at + 4, end))
}

/// The ULEB128 header of the RLE/bit-packed hybrid run at `*at` (advanced past it): the
/// run's length times 2, plus 1 for a bit-packed run. `None` when the bytes end first.
fn run_header(levels: &[u8], at: &mut usize) -> Option<u64> {
    let mut header = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *levels.get(*at)?;
        *at += 1;
        header |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(header);
        }
    }
    None
}

/// Whether RLE/bit-packed hybrid `levels` are `n` copies of `max` in RLE runs only (what a
/// writer emits for a column with no nulls and no empty lists).
fn all_max(levels: &[u8], max: i16, n: usize) -> bool {
    let width = (16 - (max as u16).leading_zeros()).div_ceil(8) as usize;
    let (mut at, mut seen) = (0usize, 0usize);
    while seen < n {
        let Some(header) = run_header(levels, &mut at) else {
            return false;
        };
        if header & 1 == 1 {
            return false; // a bit-packed run: the levels vary
        }
        let Some(v) = levels.get(at..at + width) else {
            return false;
        };
        let value = v
            .iter()
            .rev()
            .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
        if value != max as u32 {
            return false;
        }
        at += width;
        seen += (header >> 1) as usize;
    }
    seen == n
}

/// Undoes BYTE_STREAM_SPLIT: byte `b` of value `i` sits at `b * n + i`.
fn unsplit<T: Leaf>(values: &[u8], n: usize, out: &mut Vec<T>) {
    if n == 0 {
        return;
    }
    let streams: Vec<&[u8]> = values.chunks_exact(n).take(T::WIDTH).collect();
    out.reserve(n);
    match T::WIDTH {
        2 => out.extend(
            streams[0][..n]
                .iter()
                .zip(&streams[1][..n])
                .map(|(&a, &b)| T::from_le(&[a, b])),
        ),
        4 => out.extend(
            streams[0][..n]
                .iter()
                .zip(&streams[1][..n])
                .zip(&streams[2][..n])
                .zip(&streams[3][..n])
                .map(|(((&a, &b), &c), &d)| T::from_le(&[a, b, c, d])),
        ),
        _ => out.extend((0..n).map(|i| {
            let mut word = [0u8; 4];
            for (w, s) in word.iter_mut().zip(&streams) {
                *w = s[i];
            }
            T::from_le(&word[..T::WIDTH])
        })),
    }
}

/// A leaf value type of the fast path.
pub(crate) trait Leaf: Sized {
    const PHYSICAL: PhysicalType;
    const WIDTH: usize;
    fn from_le(b: &[u8]) -> Self;
}

impl Leaf for u32 {
    const PHYSICAL: PhysicalType = PhysicalType::INT32;
    const WIDTH: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Leaf for f16 {
    const PHYSICAL: PhysicalType = PhysicalType::FIXED_LEN_BYTE_ARRAY;
    const WIDTH: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        f16::from_le_bytes([b[0], b[1]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_levels_all_max() {
        // One RLE run of 300 copies of 2 (header varint 600 = [0xd8, 0x04], value byte 2).
        assert!(all_max(&[0xd8, 0x04, 2], 2, 300));
        // Two runs adding up.
        assert!(all_max(&[0x0a, 2, 0x04, 2], 2, 7));
        // Wrong value, wrong count, a bit-packed run, truncated input.
        assert!(!all_max(&[0xd8, 0x04, 1], 2, 300));
        assert!(!all_max(&[0xd8, 0x04, 2], 2, 301));
        assert!(!all_max(&[0x03, 0xff], 2, 8));
        assert!(!all_max(&[0xd8], 2, 300));
    }

    #[test]
    fn rle_bit_packed_levels_decode() {
        // One bit-packed group of 8 two-bit levels (header 3; lowest bits first), then an
        // RLE run of 5 ones (header 10).
        let levels = [3, 100, 104, 10, 1];
        let mut out = vec![];
        assert!(decode_levels(&levels, 2, 13, &mut out));
        assert_eq!(out, [0, 1, 2, 1, 0, 2, 2, 1, 1, 1, 1, 1, 1]);
        // The group's padding past the page's levels is dropped.
        out.clear();
        assert!(decode_levels(&levels[..3], 2, 5, &mut out));
        assert_eq!(out, [0, 1, 2, 1, 0]);
        // A run longer than the page (also what these bytes are read as at one bit per
        // level), truncated input, levels above the maximum.
        assert!(!decode_levels(&levels, 2, 11, &mut vec![]));
        assert!(!decode_levels(&levels, 1, 13, &mut vec![]));
        assert!(!decode_levels(&levels[..2], 2, 8, &mut vec![]));
        assert!(
            !decode_levels(&[3, 0xff, 0xff], 2, 8, &mut vec![]),
            "a level 3 above max 2"
        );
        assert!(
            !decode_levels(&[0x02, 3], 2, 1, &mut vec![]),
            "an RLE level above max 2"
        );
        // A bit-packed header of 2^62 groups: no overflow, just not there.
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(!decode_levels(&huge, 2, 8, &mut vec![]));
        // Levels 0 1 2 1 0: lists [0], [1, 2], [3], [4].
        assert_eq!(offsets_from_reps(&out), Some(vec![0, 1, 3, 4, 5]));
        assert_eq!(offsets_from_reps(&[2u8, 0]), None);
        assert_eq!(offsets_from_reps(&[1u8, 2]), None);
    }

    #[test]
    fn byte_stream_split_round_trip() {
        let vals: Vec<u32> = vec![1, 0x0102_0304, 31999, u32::MAX];
        let n = vals.len();
        let mut split = vec![0u8; n * 4];
        for (i, v) in vals.iter().enumerate() {
            for (b, byte) in v.to_le_bytes().iter().enumerate() {
                split[b * n + i] = *byte;
            }
        }
        let mut out: Vec<u32> = Vec::new();
        unsplit(&split, n, &mut out);
        assert_eq!(out, vals);
    }
}
