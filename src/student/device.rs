//! Where a student trains: `--device cpu` (burn's flex backend) or `--device cuda[:N]`
//! (burn's CUDA backend, built with the `cuda` cargo feature).
//!
//! The CUDA backend loads the driver lazily and panics when it is missing; [`check_cuda`]
//! asks the driver first (`libcuda.so.1`: `cuInit`, `cuDeviceGetCount`), so a machine without
//! a GPU, without the driver or with fewer GPUs than asked gets an error naming which.

use anyhow::bail;
use std::ffi::{CStr, c_char, c_int, c_uint};

/// Where a student trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

impl TrainDevice {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> anyhow::Result<TrainDevice> {
        match s {
            "cpu" => Ok(TrainDevice::Cpu),
            "cuda" => Ok(TrainDevice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(TrainDevice::Cuda(i)),
                _ => {
                    bail!("--device {s}: expected cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)")
                }
            },
        }
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
        assert_eq!(TrainDevice::parse("cpu").unwrap(), TrainDevice::Cpu);
        assert_eq!(TrainDevice::parse("cuda").unwrap(), TrainDevice::Cuda(0));
        assert_eq!(TrainDevice::parse("cuda:3").unwrap(), TrainDevice::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "tensorrt"] {
            let e = TrainDevice::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
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
