//! Where work runs: one [`Device`] for both stages, written `cpu`, `cuda[:N]` or
//! `tensorrt[:N]` on the command line and in run files.
//!
//! The teacher (ONNX Runtime) runs on any of them. A student trains on `cpu` (burn's flex
//! backend) or `cuda[:N]` (burn's CUDA backend, built with the `cuda` cargo feature):
//! [`parse_train_device`] is the `train --device` parser and refuses TensorRT when the flags
//! are parsed, and [`Device::check_trainable`] does the same for configs built in code.
//!
//! The CUDA backend loads the driver lazily and panics when it is missing; [`check_cuda`]
//! asks the driver first (`libcuda.so.1`: `cuInit`, `cuDeviceGetCount`), so a machine without
//! a GPU, without the driver or with fewer GPUs than asked gets an error naming which.
//!
//! ```
//! use logitcache::device::{Device, parse_train_device};
//! assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
//! assert_eq!(Device::Cuda(0).to_string(), "cuda:0");
//! assert!(parse_train_device("tensorrt:0").unwrap_err().contains("--device"));
//! ```

use anyhow::bail;
use std::ffi::{CStr, c_char, c_int, c_uint};
use std::fmt;
use std::str::FromStr;

/// Where a teacher runs or a student trains. Serialized as its [`Display`](fmt::Display)
/// form (`cpu`, `cuda:N`, `tensorrt:N`) and read back with [`FromStr`], which also takes
/// `cuda` and `tensorrt` (index 0) and `trt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(i32),
    TensorRt(i32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::TensorRt(n) => write!(f, "tensorrt:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, idx) = match s.split_once(':') {
            Some((n, i)) => (
                n,
                i.parse::<i32>().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    format!("device index in `{s}` is not a number ≥ 0; use e.g. cuda:0")
                })?,
            ),
            None => (s, 0),
        };
        match name {
            "cpu" if !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(idx)),
            "tensorrt" | "trt" => Ok(Device::TensorRt(idx)),
            _ => Err(format!(
                "unknown device `{s}`; use cpu, cuda[:N] or tensorrt[:N]"
            )),
        }
    }
}

impl serde::Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What `train --device` accepts, for error messages.
const TRAIN_DEVICES: &str = "expected cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)";

fn not_trainable(flag: &str) -> String {
    format!(
        "--device {flag}: students train on the CPU or on CUDA, TensorRT is for the teacher only; {TRAIN_DEVICES}"
    )
}

impl Device {
    /// Checks that a student can train here (`cpu` or `cuda[:N]`); the error names
    /// `--device` and what is valid.
    pub fn check_trainable(self) -> Result<Self, String> {
        match self {
            Device::Cpu | Device::Cuda(_) => Ok(self),
            Device::TensorRt(_) => Err(not_trainable(&self.to_string())),
        }
    }
}

/// The `train --device` parser: `cpu`, `cuda` (GPU 0) or `cuda:N`; errors quote the flag
/// as given.
pub fn parse_train_device(s: &str) -> Result<Device, String> {
    match s.parse::<Device>() {
        Ok(d @ (Device::Cpu | Device::Cuda(_))) => Ok(d),
        Ok(Device::TensorRt(_)) => Err(not_trainable(s)),
        Err(_) => Err(format!("--device {s}: {TRAIN_DEVICES}")),
    }
}

/// Checks that the CUDA driver loads, initialises and sees GPU `index`.
pub fn check_cuda(index: usize) -> anyhow::Result<()> {
    check_cuda_with("libcuda.so.1", index)
}

fn check_cuda_with(library: &str, index: usize) -> anyhow::Result<()> {
    let name = std::ffi::CString::new(library).expect("library name without NUL: this is a bug");
    // SAFETY: dlopen/dlsym/dlclose with a valid C string; the symbols are called with the
    // signatures of the CUDA driver API (CUresult cuInit(unsigned), cuDeviceGetCount(int*)).
    unsafe {
        let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            bail!(
                "--device cuda:{index}: the NVIDIA driver library {library} cannot be loaded ({}); train on a machine with an NVIDIA GPU and its driver, or use --device cpu",
                dl_error()
            );
        }
        let result = (|| {
            let init = libc::dlsym(lib, c"cuInit".as_ptr());
            let count = libc::dlsym(lib, c"cuDeviceGetCount".as_ptr());
            if init.is_null() || count.is_null() {
                bail!(
                    "--device cuda:{index}: {library} has no cuInit/cuDeviceGetCount; is it the NVIDIA driver?"
                );
            }
            let init: extern "C" fn(c_uint) -> c_int = std::mem::transmute(init);
            let count: extern "C" fn(*mut c_int) -> c_int = std::mem::transmute(count);
            let rc = init(0);
            if rc != 0 {
                bail!(
                    "--device cuda:{index}: the CUDA driver failed to initialise (CUresult {rc}{}); check `nvidia-smi`, or use --device cpu",
                    if rc == 100 {
                        ": no CUDA-capable device"
                    } else {
                        ""
                    }
                );
            }
            let mut n: c_int = 0;
            let rc = count(&mut n);
            if rc != 0 {
                bail!("--device cuda:{index}: cannot count the GPUs (CUresult {rc})");
            }
            if index >= n as usize {
                bail!(
                    "--device cuda:{index}: the driver sees {n} GPU(s); use an index from 0 to {}",
                    (n as usize).saturating_sub(1)
                );
            }
            Ok(())
        })();
        libc::dlclose(lib);
        result
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libc.
    unsafe {
        let e: *const c_char = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(parse_train_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_train_device("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(parse_train_device("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "tensorrt"] {
            let e = parse_train_device(bad).unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        let e = parse_train_device("trt").unwrap_err();
        assert!(
            e.contains("--device trt:") && e.contains("TensorRT is for the teacher"),
            "{e}"
        );
    }

    #[test]
    fn serializes_as_its_flag_text() {
        for (d, s) in [
            (Device::Cpu, "\"cpu\""),
            (Device::Cuda(2), "\"cuda:2\""),
            (Device::TensorRt(0), "\"tensorrt:0\""),
        ] {
            assert_eq!(serde_json::to_string(&d).unwrap(), s);
            assert_eq!(serde_json::from_str::<Device>(s).unwrap(), d);
        }
        // Run directories written before the type existed hold the flag as given.
        assert_eq!(
            serde_json::from_str::<Device>("\"cuda\"").unwrap(),
            Device::Cuda(0)
        );
        assert!(serde_json::from_str::<Device>("\"gpu\"").is_err());
    }

    #[test]
    fn missing_driver_is_a_clear_error() {
        let e = check_cuda_with("libcuda-not-here.so.1", 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("libcuda-not-here.so.1 cannot be loaded") && e.contains("--device cpu"),
            "{e}"
        );
    }

    #[test]
    fn a_library_without_the_driver_api_is_refused() {
        // libc is loadable but has no cuInit.
        let e = check_cuda_with("libc.so.6", 0).unwrap_err().to_string();
        assert!(e.contains("no cuInit"), "{e}");
    }
}
