//! What a hostile guest can send the host: any byte stream, in any split. The
//! incremental decoder (the monitor's event stream) and the blocking reader (the
//! CLI's control and exec connections) must never panic, must agree frame for
//! frame, must stay bounded, and every frame they accept must survive a round trip.
#![no_main]

use std::io::Cursor;

use krun_oci_protocol::{read_frame, Decoder, Frame, ProtocolError, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream arrives: reads of 1..=256 bytes.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let read_size = split as usize + 1;

    let mut decoder = Decoder::new();
    let mut incremental = Vec::new();
    'stream: for piece in stream.chunks(read_size) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => incremental.push(frame),
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
        // Whatever is left is less than one maximal frame.
        assert!(decoder.pending() < 4 + MAX_FRAME_LEN as usize);
    }

    let mut cursor = Cursor::new(stream);
    let mut blocking = Vec::new();
    while let Ok(frame) = read_frame(&mut cursor) {
        blocking.push(frame);
    }
    assert_eq!(incremental, blocking, "the two decoders disagree");

    for frame in incremental {
        roundtrip(frame);
    }
});

fn roundtrip(frame: Frame) {
    let bytes = match frame.encode() {
        Ok(b) => b,
        // Re-serialized JSON can be longer than what arrived (defaults written out).
        Err(ProtocolError::PayloadTooLarge(_)) => return,
        Err(e) => panic!("a decoded frame does not encode: {e}"),
    };
    let again = read_frame(&mut Cursor::new(&bytes)).expect("an encoded frame decodes");
    assert_eq!(again, frame, "the round trip changed the frame");
}
