//! Loading ONNX Runtime: finding `libonnxruntime.so` (`--ort-lib`, `ORT_DYLIB_PATH`, the
//! `.ort/` folder `make setup` fills) and the process's one environment.

use super::OrtError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// File name of the library `make setup` extracts into `.ort/`.
pub const ORT_LIB_NAME: &str = "libonnxruntime.so.1.32.0";

/// Finds the ONNX Runtime library: `explicit` (from `--ort-lib` or `ORT_DYLIB_PATH`), else
/// the `.ort/` folder `make setup` fills (next to the working directory or the source tree).
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, OrtError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(OrtError::NoLibrary {
                tried: format!(
                    "{} (given by --ort-lib or ORT_DYLIB_PATH; not a file)",
                    p.display()
                ),
            })
        };
    }
    let candidates = [
        PathBuf::from(".ort").join(ORT_LIB_NAME),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".ort")
            .join(ORT_LIB_NAME),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OrtError::NoLibrary {
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

static ENV: OnceLock<(PathBuf, ort::environment::Environment)> = OnceLock::new();

/// The process's one ONNX Runtime environment, loaded from `lib` on first use.
pub fn environment(lib: &Path) -> Result<&'static ort::environment::Environment, OrtError> {
    if let Some((_, env)) = ENV.get() {
        return Ok(env);
    }
    let builder = ort::init_from(lib).map_err(|e| OrtError::Load {
        path: lib.to_path_buf(),
        why: e.to_string(),
    })?;
    let env = builder
        .with_name("logitcache")
        .build()
        .map_err(|e| OrtError::Load {
            path: lib.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok(&ENV.get_or_init(|| (lib.to_path_buf(), env)).1)
}
