//! The crate's error type: every public function returns `Result<_, Error>`; nothing panics across
//! the public API.

use std::fmt;

/// Everything that can go wrong in a call. New variants may come in a minor release: match with a
/// wildcard arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An argument does not have the expected shape or value; nothing was launched.
    InvalidArgument {
        /// The argument's name as in the API (`cu_seqlens`, `advantages`, `config.clip_low`, ...).
        arg: &'static str,
        /// What was expected and what was given.
        message: String,
    },
    /// The crate was built without nvcc, so there are no GPU kernels.
    NoKernels,
    /// No usable CUDA driver or device.
    NoDevice(String),
    /// A CUDA driver call failed.
    Driver(cudarc::driver::DriverError),
    /// Unmasked tokens held non-finite inputs (NaN or Inf); set `allow_nonfinite` to get the result.
    NonFinite {
        /// Number of non-finite input values read at unmasked tokens.
        count: u64,
    },
}

impl Error {
    /// [`Error::InvalidArgument`] for the argument `arg` (its name as in the API).
    pub fn invalid_argument(arg: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, message } => {
                write!(f, "invalid argument `{arg}`: {message}")
            }
            Error::NoKernels => write!(
                f,
                "built without CUDA kernels: install nvcc (scripts/install-nvcc.sh) and rebuild"
            ),
            Error::NoDevice(why) => write!(f, "no usable CUDA device: {why}"),
            Error::Driver(e) => write!(f, "CUDA driver error: {e:?}"),
            Error::NonFinite { count } => write!(
                f,
                "{count} non-finite input value(s) (NaN or Inf) at unmasked tokens; \
                 fix the inputs or set allow_nonfinite to get the (non-finite) result"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e)
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
