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
        /// The first input found holding one, when the call could tell (the synchronous calls
        /// look when they fail; an asynchronous call's read cannot).
        arg: Option<&'static str>,
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
            Error::NonFinite { count, arg } => {
                write!(
                    f,
                    "{count} non-finite input value(s) (NaN or Inf) at unmasked tokens"
                )?;
                if let Some(a) = arg {
                    write!(f, ", first in `{a}`")?;
                }
                write!(
                    f,
                    "; fix the inputs or set allow_nonfinite to get the (non-finite) result"
                )
            }
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

/// A JSON object of options that does not parse as `T`: the error for `config`, naming the first
/// field that fails on its own (serde's message names only the type it expected).
pub(crate) fn json_options_error<T: serde::de::DeserializeOwned>(
    json: &str,
    e: serde_json::Error,
) -> Error {
    let field = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json)
        .ok()
        .and_then(|m| {
            m.into_iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v)].into_iter().collect());
                serde_json::from_value::<T>(one).is_err().then_some(k)
            })
        });
    let message = match field {
        Some(f) => format!("field `{f}`: {e} (in {json})"),
        None => format!("{e} (in {json})"),
    };
    Error::invalid_argument("config", message)
}
