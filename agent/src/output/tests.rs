use super::*;

fn data(byte: u8, len: usize) -> Piece {
    Piece::Data(vec![byte; len])
}

fn attach(backlog: &mut Backlog, from: u64, acknowledging: bool) -> Reader {
    let generation = backlog
        .attach(Attach {
            from,
            acknowledging,
        })
        .expect("attach");
    Reader {
        generation,
        acknowledging,
    }
}

#[test]
fn a_full_backlog_counts_what_it_drops_in_place() {
    let mut backlog = Backlog::default();
    backlog.push(vec![1; MAX_BACKLOG - 10]);
    backlog.push(vec![2; 20]);
    backlog.push(vec![3; 30]);
    backlog.push(vec![4; 5]);
    assert_eq!(backlog.bytes, MAX_BACKLOG - 5);
    let reader = attach(&mut backlog, 0, false);
    assert_eq!(backlog.next(reader), Some((0, data(1, MAX_BACKLOG - 10))));
    let at = (MAX_BACKLOG - 10) as u64;
    assert_eq!(backlog.next(reader), Some((at, Piece::Lost(50))));
    assert_eq!(backlog.next(reader), Some((at + 50, data(4, 5))));
    assert_eq!(backlog.next(reader), None);
    assert_eq!(backlog.bytes, 0);
    backlog.unpop(data(4, 5));
    assert_eq!(backlog.bytes, 5);
    assert_eq!(backlog.next(reader), Some((at + 50, data(4, 5))));
}

#[test]
fn unconfirmed_pieces_come_again_from_the_confirmed_offset() {
    let mut backlog = Backlog::default();
    backlog.push(vec![1; 10]);
    backlog.push(vec![2; 10]);
    backlog.push(vec![3; 10]);
    let first = attach(&mut backlog, 0, true);
    assert_eq!(backlog.next(first), Some((0, data(1, 10))));
    assert_eq!(backlog.next(first), Some((10, data(2, 10))));
    // Sent but unconfirmed bytes still count against the bound.
    assert_eq!(backlog.bytes, 30);
    backlog.forget_until(4, true);
    assert_eq!(backlog.bytes, 26);
    // The reader dies having kept 14 bytes; its successor says so.
    backlog.reader = None;
    let second = attach(&mut backlog, 14, true);
    assert_eq!(backlog.next(second), Some((14, data(2, 6))));
    assert_eq!(backlog.next(second), Some((20, data(3, 10))));
    assert_eq!(backlog.next(second), None);
    backlog.forget_until(30, true);
    assert_eq!(
        (backlog.bytes, backlog.start, backlog.sent_span),
        (0, 30, 0)
    );
}

#[test]
fn an_acknowledging_reader_replaces_one_still_attached() {
    let mut backlog = Backlog::default();
    backlog.push(vec![1; 8]);
    let old = attach(&mut backlog, 0, true);
    assert!(backlog.next(old).is_some());
    let new = attach(&mut backlog, 0, true);
    assert!(backlog.current(old.generation).is_none());
    assert_eq!(backlog.next(new), Some((0, data(1, 8))));
    // Only an acknowledging reader may replace one.
    assert!(matches!(
        backlog.attach(Attach {
            from: 0,
            acknowledging: false
        }),
        Err(AttachError::AlreadyRead)
    ));
}

#[test]
fn a_reader_cannot_claim_more_than_the_stream_made() {
    let mut backlog = Backlog::default();
    backlog.push(vec![1; 8]);
    let err = backlog
        .attach(Attach {
            from: 9,
            acknowledging: true,
        })
        .unwrap_err();
    assert!(
        matches!(err, AttachError::Beyond { from: 9, end: 8 }),
        "{err}"
    );
    // Exactly at the end is fine: nothing comes until more is written.
    let reader = attach(&mut backlog, 8, true);
    assert_eq!(backlog.next(reader), None);
    assert_eq!(backlog.bytes, 0);
}

#[test]
fn a_gap_is_skipped_partly_on_resume() {
    let mut backlog = Backlog::default();
    let kept = MAX_BACKLOG - 50;
    backlog.push(vec![1; kept]);
    backlog.push(vec![2; 100]);
    backlog.push(vec![3; 5]);
    let at = kept as u64 + 40;
    let reader = attach(&mut backlog, at, true);
    assert_eq!(backlog.next(reader), Some((at, Piece::Lost(60))));
    assert_eq!(backlog.next(reader), Some((at + 60, data(3, 5))));
    assert_eq!(backlog.bytes, 5);
}

#[test]
fn confirming_more_than_was_sent_keeps_what_was_not() {
    let mut backlog = Backlog::default();
    backlog.push(vec![1; 10]);
    backlog.push(vec![2; 10]);
    let reader = attach(&mut backlog, 0, true);
    assert!(backlog.next(reader).is_some());
    let output = Output::default();
    *lock(&output.shared) = backlog;
    output.acknowledge(reader.generation, 1000);
    let mut backlog = lock(&output.shared);
    assert_eq!((backlog.start, backlog.bytes), (10, 10));
    assert_eq!(backlog.next(reader), Some((10, data(2, 10))));
    drop(backlog);
    // A replaced reader's confirmations are ignored.
    output.acknowledge(reader.generation + 1, 20);
    assert_eq!(lock(&output.shared).start, 10);
}
