//! GPT-2's byte-level alphabet: which character stands for which byte.

/// GPT-2's byte → character table (`bytes_to_unicode` in transformers).
/// Byte-level BPE learns merges over *strings*, and its vocabulary and
/// `merges.txt` are text files with one space-separated pair per line, so
/// every one of the 256 byte values needs a visible character of its own that
/// is neither whitespace nor a control code: the 188 printable Latin-1 bytes
/// stand for themselves and the other 68 (controls, space, DEL, NBSP, soft
/// hyphen) take U+0100 onwards in order. Hence space (0x20) is `Ġ` (U+0120)
/// and newline (0x0A) is `Ċ` (U+010A). `tokenizers` keeps this table private;
/// a test checks this one against its alphabet and against Python's.
pub fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 0x100;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).expect("below U+0200");
    }
    table
}

/// The bytes a byte-level token stands for (`Ġthe` → ` the`), through the
/// inverse of [`bytes_to_unicode`]; `None` when a character of `token` is
/// not in the byte alphabet (a SentencePiece piece such as `▁the`).
pub fn token_bytes(token: &str) -> Option<Vec<u8>> {
    let table = bytes_to_unicode();
    token
        .chars()
        .map(|c| table.iter().position(|&t| t == c).map(|b| b as u8))
        .collect()
}
