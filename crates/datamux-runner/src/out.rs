//! Standard output that ends quietly when its reader goes (`datamux check | head -2`):
//! `println!` panics on a closed pipe; these stop writing instead.

use std::io::Write as _;

/// Write `text` and a newline to stdout; false once the reader has gone (a broken pipe), after
/// which the caller should stop writing. Other write errors are reported on stderr once.
pub fn line(text: impl std::fmt::Display) -> bool {
    Stdout::lock().line(&text.to_string())
}

/// A locked stdout for many lines.
pub struct Stdout {
    out: std::io::StdoutLock<'static>,
    gone: bool,
}

impl Stdout {
    pub fn lock() -> Self {
        Self {
            out: std::io::stdout().lock(),
            gone: false,
        }
    }

    /// [`line`] on the locked stream.
    pub fn line(&mut self, text: &str) -> bool {
        if self.gone {
            return false;
        }
        let r = writeln!(self.out, "{text}").and_then(|()| self.out.flush());
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("error: cannot write to stdout: {e}");
            }
            self.gone = true;
        }
        !self.gone
    }
}
