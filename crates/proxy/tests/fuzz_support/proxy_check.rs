//! The checks of the `proxy_header` fuzz target, shared with `cargo test`: any bytes through
//! `portcullis_proxy::decode` never panic, and what it says is consistent with reading the
//! connection exactly as it asks.

use portcullis_proxy::{FIXED_LEN, MAX_HEADER_LEN, Progress, decode};

/// Decodes `data` whole and as a server reads it (exactly the bytes asked for each time), and
/// checks that both agree and that no read goes past the header.
pub fn check(data: &[u8]) {
    let whole = decode(data);
    if let Ok(Progress::Need(n)) = &whole {
        assert!(*n > 0, "Need(0) on {} bytes", data.len());
        assert!(data.len() + n <= MAX_HEADER_LEN, "asks past the limit");
    }
    if let Ok(Progress::Done(header)) = &whole {
        assert!(header.len >= FIXED_LEN && header.len <= MAX_HEADER_LEN);
        assert!(header.len <= data.len());
        // What follows the header is not looked at.
        assert_eq!(decode(&data[..header.len]), whole);
    }

    // The server's way: start from nothing, read exactly what is asked for.
    let mut read = 0;
    loop {
        match decode(&data[..read]) {
            Ok(Progress::Need(n)) => {
                assert!(n > 0);
                if read + n > data.len() {
                    // The connection ends before the header does.
                    assert!(matches!(whole, Ok(Progress::Need(_)) | Err(_)));
                    break;
                }
                read += n;
            }
            Ok(Progress::Done(header)) => {
                assert_eq!(header.len, read, "the header ends where the reads end");
                assert_eq!(whole, Ok(Progress::Done(header)));
                break;
            }
            Err(e) => {
                // A refusal on what was read stands on more bytes too.
                assert_eq!(whole.map(|_| ()), Err(e));
                break;
            }
        }
    }
}
