//! The local terminal for `shell`: raw mode while the remote shell runs, and the window size.

use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode until dropped (nothing when stdin is not a terminal).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = termios::tcsetattr(&stdin, OptionalActions::Now, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
    }
}

/// Rows and columns of the terminal on stdout; 24×80 when it is not a terminal.
pub fn size() -> (u16, u16) {
    match termios::tcgetwinsize(std::io::stdout()) {
        Ok(ws) if ws.ws_row > 0 && ws.ws_col > 0 => (ws.ws_row, ws.ws_col),
        _ => (24, 80),
    }
}
