//! The cache: Parquet shards + `manifest.json` (schema in `schemas/`), written by the teacher
//! stage, checked by `verify`, summarised by `inspect`, read by students.

pub mod dir;
pub mod inspect;
pub mod lock;
pub mod manifest;
mod pages;
pub mod reader;
pub mod rows;
pub mod schema;
pub mod stream;
pub mod verify;
pub mod writer;
