use super::*;

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes([byte; 32])
}

fn ring(current: u8, next: Option<u8>) -> KeyRing {
    KeyRing::new(key(current), next.map(key))
}

fn nonce(byte: u8) -> [u8; NONCE_BYTES] {
    [byte; NONCE_BYTES]
}

fn everyone(_: NodeId) -> bool {
    true
}

/// The messages of one run, and how each side ended.
struct Run {
    hello: Vec<u8>,
    challenge: Vec<u8>,
    proof: Vec<u8>,
    initiator: Result<Option<Established>, HandshakeError>,
    responder: Result<Option<Established>, HandshakeError>,
}

/// Runs a handshake between node 1 (initiator, keys `a`) and node 2 (responder, keys
/// `b`), letting `tamper` change each message on the wire (index 0, 1, 2).
fn run_with(
    a: &KeyRing,
    b: &KeyRing,
    members: &dyn Fn(NodeId) -> bool,
    tamper: &mut dyn FnMut(usize, &mut Vec<u8>),
) -> Run {
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(a, 1, 2, nonce(0xa1), &mut hello);
    let mut responder = Handshake::responder(b, 2, nonce(0xb2));
    tamper(0, &mut hello);
    let mut run = Run {
        hello: hello.clone(),
        challenge: Vec::new(),
        proof: Vec::new(),
        initiator: Ok(None),
        responder: Ok(None),
    };
    let mut challenge = Vec::new();
    match responder.receive(&hello, members, &mut challenge) {
        Ok(Step::Continue { consumed }) => assert_eq!(consumed, hello.len()),
        Ok(other) => panic!("unexpected step {other:?}"),
        Err(e) => {
            assert!(challenge.is_empty(), "nothing is sent on an error");
            run.responder = Err(e);
            return run;
        }
    }
    tamper(1, &mut challenge);
    run.challenge = challenge.clone();
    let mut proof = Vec::new();
    match initiator.receive(&challenge, members, &mut proof) {
        Ok(Step::Established(done)) => {
            assert_eq!(done.consumed, challenge.len());
            run.initiator = Ok(Some(*done));
        }
        Ok(other) => panic!("unexpected step {other:?}"),
        Err(e) => {
            assert!(proof.is_empty(), "nothing is sent on an error");
            run.initiator = Err(e);
            return run;
        }
    }
    tamper(2, &mut proof);
    run.proof = proof.clone();
    let mut nothing = Vec::new();
    match responder.receive(&proof, members, &mut nothing) {
        Ok(Step::Established(done)) => {
            assert_eq!(done.consumed, proof.len());
            run.responder = Ok(Some(*done));
        }
        Ok(other) => panic!("unexpected step {other:?}"),
        Err(e) => run.responder = Err(e),
    }
    assert!(nothing.is_empty());
    run
}

fn run(a: &KeyRing, b: &KeyRing) -> Run {
    run_with(a, b, &everyone, &mut |_, _| {})
}

fn established(run: Run) -> (Established, Established) {
    let i = run.initiator.expect("initiator").expect("initiator done");
    let r = run.responder.expect("responder").expect("responder done");
    (i, r)
}

/// Both sessions talk to each other in both directions.
fn assert_sessions_pair(i: &mut Established, r: &mut Established) {
    for round in 0..3u8 {
        let mut wire = vec![round; 20];
        i.session.sealer.seal(&mut wire, 0).unwrap();
        assert_eq!(r.session.opener.open(&wire).unwrap(), &[round; 20]);
        let mut wire = vec![round + 100; 5];
        r.session.sealer.seal(&mut wire, 0).unwrap();
        assert_eq!(i.session.opener.open(&wire).unwrap(), &[round + 100; 5]);
    }
}

#[test]
fn mutual_handshake_establishes_paired_sessions() {
    let keys = ring(7, None);
    let (mut i, mut r) = established(run(&keys, &keys));
    assert_eq!(i.peer, 2);
    assert_eq!(r.peer, 1);
    assert_eq!(i.key, key(7).id());
    assert_eq!(r.key, key(7).id());
    assert_sessions_pair(&mut i, &mut r);
}

#[test]
fn sessions_differ_per_connection() {
    let keys = ring(7, None);
    let (mut i1, _) = established(run(&keys, &keys));
    // A second connection with other nonces.
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(0x11), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(0x22));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let mut proof = Vec::new();
    initiator
        .receive(&challenge, &everyone, &mut proof)
        .unwrap();
    let Step::Established(mut r2) = responder
        .receive(&proof, &everyone, &mut Vec::new())
        .unwrap()
    else {
        panic!("not established")
    };
    // A frame of connection 1 does not open on connection 2.
    let mut wire = b"append".to_vec();
    i1.session.sealer.seal(&mut wire, 0).unwrap();
    assert!(r2.session.opener.open(&wire).is_err());
}

#[test]
fn the_peers_first_frames_may_follow_the_proof_in_the_same_read() {
    let keys = ring(7, None);
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let mut wire = Vec::new();
    let Step::Established(mut i) = initiator.receive(&challenge, &everyone, &mut wire).unwrap()
    else {
        panic!("initiator not established")
    };
    let proof_len = wire.len();
    let frame_start = wire.len();
    wire.extend_from_slice(b"first frame");
    i.session.sealer.seal(&mut wire, frame_start).unwrap();
    let Step::Established(mut r) = responder
        .receive(&wire, &everyone, &mut Vec::new())
        .unwrap()
    else {
        panic!("responder not established")
    };
    assert_eq!(r.consumed, proof_len);
    assert_eq!(
        r.session.opener.open(&wire[r.consumed..]).unwrap(),
        b"first frame"
    );
}

#[test]
fn messages_arriving_byte_by_byte_need_more_until_whole() {
    let keys = ring(7, None);
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    for len in 0..hello.len() {
        let step = responder.receive(&hello[..len], &everyone, &mut Vec::new());
        assert!(matches!(step, Ok(Step::NeedMore)), "len {len}: {step:?}");
    }
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    for len in 0..challenge.len() {
        let step = initiator.receive(&challenge[..len], &everyone, &mut Vec::new());
        assert!(matches!(step, Ok(Step::NeedMore)), "len {len}: {step:?}");
    }
    let mut proof = Vec::new();
    initiator
        .receive(&challenge, &everyone, &mut proof)
        .unwrap();
    for len in 0..proof.len() {
        let step = responder.receive(&proof[..len], &everyone, &mut Vec::new());
        assert!(matches!(step, Ok(Step::NeedMore)), "len {len}: {step:?}");
    }
    assert!(matches!(
        responder.receive(&proof, &everyone, &mut Vec::new()),
        Ok(Step::Established(_))
    ));
}

#[test]
fn no_common_key_is_refused_naming_both_key_ids() {
    let run = run(&ring(7, None), &ring(8, None));
    let Err(error) = run.responder else {
        panic!("accepted a stranger's key")
    };
    assert_eq!(
        error,
        HandshakeError::NoCommonKey {
            offered: vec![key(7).id()],
            held: vec![key(8).id()],
        }
    );
    let text = error.to_string();
    assert!(text.contains(&key(7).id().to_string()), "{text}");
    assert!(text.contains(&key(8).id().to_string()), "{text}");
}

/// HMAC under `key` of `label` and `transcript`, as an impostor holding `key` computes it.
fn mac_of(key: &ClusterKey, label: &[u8], transcript: &[u8]) -> [u8; MAC_BYTES] {
    let mut mac = key.mac();
    mac.update(label);
    mac.update(transcript);
    mac.finalize().into_bytes().into()
}

#[test]
fn an_initiator_with_the_wrong_key_is_refused_even_if_it_offers_the_right_key_id() {
    // The impostor (key 9) offers the id of the real key 7 (ids are public).
    let real = ring(7, None);
    let impostor = ring(9, None);
    let mut hello = Vec::new();
    let _ = Handshake::initiator(&impostor, 1, 2, nonce(1), &mut hello);
    let id_at = HEADER_BYTES + HELLO_FIXED_BYTES;
    hello[id_at..id_at + KEY_ID_BYTES].copy_from_slice(&key(7).id().0);

    let mut responder = Handshake::responder(&real, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let mut transcript = hello.clone();
    transcript.extend_from_slice(&challenge[..challenge.len() - MAC_BYTES]);
    let mut proof = Vec::new();
    Message::Proof(Proof {
        mac: mac_of(&key(9), LABEL_INITIATOR_PROOF, &transcript),
    })
    .encode(&mut proof);
    assert_eq!(
        responder
            .receive(&proof, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::BadProof { peer: 1 }
    );
}

#[test]
fn a_responder_with_the_wrong_key_is_refused_even_if_it_names_the_right_key_id() {
    let real = ring(7, None);
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&real, 1, 2, nonce(1), &mut hello);
    // The impostor (key 9) answers as node 2, naming key 7 and MACing with key 9.
    let mut challenge = Vec::new();
    let c = Challenge {
        from: 2,
        to: 1,
        nonce: nonce(2),
        key: key(7).id(),
        mac: [0; MAC_BYTES],
    };
    Message::Challenge(c.clone()).encode(&mut challenge);
    let mut transcript = hello.clone();
    transcript.extend_from_slice(&challenge[..challenge.len() - MAC_BYTES]);
    let mac = mac_of(&key(9), LABEL_RESPONDER_PROOF, &transcript);
    let at = challenge.len() - MAC_BYTES;
    challenge[at..].copy_from_slice(&mac);
    let mut proof = Vec::new();
    assert_eq!(
        initiator
            .receive(&challenge, &everyone, &mut proof)
            .unwrap_err(),
        HandshakeError::BadProof { peer: 2 }
    );
    assert!(proof.is_empty(), "no proof is given to an impostor");
}

#[test]
fn unknown_node_ids_are_refused_on_both_sides() {
    let keys = ring(7, None);
    let not_node_1 = |id: NodeId| id != 1;
    let run1 = run_with(&keys, &keys, &not_node_1, &mut |_, _| {});
    assert_eq!(
        run1.responder.unwrap_err(),
        HandshakeError::UnknownNode { id: 1 }
    );
    assert!(run1.challenge.is_empty(), "a stranger gets no challenge");

    // The initiator refuses a peer that left the membership since it was dialled.
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let not_node_2 = |id: NodeId| id != 2;
    assert_eq!(
        initiator
            .receive(&challenge, &not_node_2, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::UnknownNode { id: 2 }
    );
}

#[test]
fn misaddressed_hellos_and_wrong_peers_are_refused() {
    let keys = ring(7, None);
    // Node 1 dials node 3, but the address reaches node 2.
    let mut hello = Vec::new();
    let _ = Handshake::initiator(&keys, 1, 3, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    assert_eq!(
        responder
            .receive(&hello, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::WrongDestination { to: 3, me: 2 }
    );
    // Someone rewrites the hello so that node 2 answers: node 1 refuses node 2.
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 3, nonce(1), &mut hello);
    hello[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&2u64.to_le_bytes());
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    assert_eq!(
        initiator
            .receive(&challenge, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::WrongPeer {
            expected: 3,
            got: 2
        }
    );
}

#[test]
fn replayed_messages_are_refused() {
    let keys = ring(7, None);
    let recorded = run(&keys, &keys);
    assert!(recorded.responder.is_ok() && recorded.initiator.is_ok());

    // An eavesdropper replays node 1's hello and proof to node 2 on a new connection.
    let mut responder = Handshake::responder(&keys, 2, nonce(0x55));
    let mut challenge = Vec::new();
    responder
        .receive(&recorded.hello, &everyone, &mut challenge)
        .unwrap();
    assert_eq!(
        responder
            .receive(&recorded.proof, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::BadProof { peer: 1 }
    );

    // It plays node 2 towards node 1, replaying node 2's recorded challenge.
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(0x66), &mut hello);
    let mut proof = Vec::new();
    assert_eq!(
        initiator
            .receive(&recorded.challenge, &everyone, &mut proof)
            .unwrap_err(),
        HandshakeError::BadProof { peer: 2 }
    );
    assert!(proof.is_empty());

    // Even with the same initiator nonce as recorded, a fresh responder nonce defeats it.
    let mut responder = Handshake::responder(&keys, 2, nonce(0xb3));
    let mut challenge = Vec::new();
    responder
        .receive(&recorded.hello, &everyone, &mut challenge)
        .unwrap();
    assert_ne!(challenge, recorded.challenge);
    assert!(responder
        .receive(&recorded.proof, &everyone, &mut Vec::new())
        .is_err());
}

#[test]
fn reflected_messages_are_refused() {
    let keys = ring(7, None);
    // The responder's own challenge MAC sent back as the proof.
    let mut hello = Vec::new();
    let _ = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let mut proof = Vec::new();
    Message::Proof(Proof {
        mac: array_at(&challenge, challenge.len() - MAC_BYTES),
    })
    .encode(&mut proof);
    assert_eq!(
        responder
            .receive(&proof, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::BadProof { peer: 1 }
    );

    // A node's hello reflected back to it: it claims the node's own id.
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut as_responder = Handshake::responder(&keys, 1, nonce(3));
    assert_eq!(
        as_responder
            .receive(&hello, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::OwnId { id: 1 }
    );
    // And echoed on the same connection it is the wrong message.
    assert_eq!(
        initiator
            .receive(&hello, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::Unexpected {
            expected: "challenge",
            got: "hello"
        }
    );

    // A hello that carries the responder's own nonce is refused.
    let mut hello = Vec::new();
    let _ = Handshake::initiator(&keys, 1, 2, nonce(9), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(9));
    assert_eq!(
        responder
            .receive(&hello, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::NonceReused
    );
}

#[test]
fn any_tampered_byte_stops_the_handshake() {
    let keys = ring(7, Some(8));
    let clean = run(&keys, &keys);
    let lengths = [clean.hello.len(), clean.challenge.len(), clean.proof.len()];
    for (message, &len) in lengths.iter().enumerate() {
        for byte in 0..len {
            for bit in [0, 3, 7] {
                let mut tamper = |index: usize, wire: &mut Vec<u8>| {
                    if index == message {
                        wire[byte] ^= 1 << bit;
                    }
                };
                let run = run_with(&keys, &keys, &everyone, &mut tamper);
                let both =
                    matches!(run.initiator, Ok(Some(_))) && matches!(run.responder, Ok(Some(_)));
                assert!(!both, "message {message} byte {byte} bit {bit}: accepted");
                // A changed hello or challenge stops both sides before either trusts
                // the other; a changed proof is refused by the responder.
                let refused = match message {
                    0 | 1 => {
                        !matches!(run.initiator, Ok(Some(_)))
                            && !matches!(run.responder, Ok(Some(_)))
                            && (run.initiator.is_err() || run.responder.is_err())
                    }
                    _ => run.responder.is_err(),
                };
                assert!(refused, "message {message} byte {byte} bit {bit}");
            }
        }
    }
}

#[test]
fn next_key_is_accepted_during_a_rotation() {
    // Step 2: A alone <-> A+B, both directions, agree on A.
    for (a, b) in [
        (ring(1, None), ring(1, Some(2))),
        (ring(1, Some(2)), ring(1, None)),
    ] {
        let (mut i, mut r) = established(run(&a, &b));
        assert_eq!(i.key, key(1).id());
        assert_eq!(r.key, key(1).id());
        assert_sessions_pair(&mut i, &mut r);
    }
    // Step 3: A+B <-> B alone, both directions, agree on B.
    for (a, b) in [
        (ring(1, Some(2)), ring(2, None)),
        (ring(2, None), ring(1, Some(2))),
    ] {
        let (mut i, mut r) = established(run(&a, &b));
        assert_eq!(i.key, key(2).id());
        assert_eq!(r.key, key(2).id());
        assert_sessions_pair(&mut i, &mut r);
    }
    // The responder prefers its current key when both are shared.
    let (i, _) = established(run(&ring(1, Some(2)), &ring(2, Some(1))));
    assert_eq!(i.key, key(2).id());
    // A alone and B alone share nothing.
    assert!(matches!(
        run(&ring(1, None), &ring(2, None)).responder,
        Err(HandshakeError::NoCommonKey { .. })
    ));
}

#[test]
fn a_finished_or_failed_handshake_accepts_nothing_more() {
    let keys = ring(7, None);
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    let mut proof = Vec::new();
    initiator
        .receive(&challenge, &everyone, &mut proof)
        .unwrap();
    assert_eq!(
        initiator
            .receive(&challenge, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::Finished
    );
    let mut garbage = proof.clone();
    garbage[0] = b'X';
    assert!(responder
        .receive(&garbage, &everyone, &mut Vec::new())
        .is_err());
    assert_eq!(
        responder
            .receive(&proof, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::Finished
    );
}

#[test]
fn bytes_sent_before_their_turn_are_refused() {
    let keys = ring(7, None);
    let mut hello = Vec::new();
    let mut initiator = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    hello.push(0);
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut out = Vec::new();
    assert_eq!(
        responder.receive(&hello, &everyone, &mut out).unwrap_err(),
        HandshakeError::SentAhead { bytes: 1 }
    );
    assert!(out.is_empty());
    hello.pop();
    let mut responder = Handshake::responder(&keys, 2, nonce(2));
    let mut challenge = Vec::new();
    responder
        .receive(&hello, &everyone, &mut challenge)
        .unwrap();
    challenge.extend_from_slice(b"early");
    assert_eq!(
        initiator
            .receive(&challenge, &everyone, &mut Vec::new())
            .unwrap_err(),
        HandshakeError::SentAhead { bytes: 5 }
    );
}

fn malformed_at(bytes: &[u8]) -> usize {
    match decode(bytes) {
        Err(HandshakeError::Malformed { offset, .. }) => offset,
        other => panic!("{bytes:02x?} decoded as {other:?}"),
    }
}

#[test]
fn the_decoder_refuses_bad_headers_as_soon_as_they_show() {
    assert!(matches!(decode(&[]), Ok(None)));
    assert_eq!(malformed_at(b"X"), 0);
    assert_eq!(
        malformed_at(b"VGLF\x01\x01"),
        0,
        "a frame is not a handshake"
    );
    assert!(matches!(decode(b"VGL"), Ok(None)));
    assert_eq!(malformed_at(b"VGLH\x02"), 4);
    assert_eq!(malformed_at(b"VGLH\x01\x00"), 5);
    assert_eq!(malformed_at(b"VGLH\x01\x04"), 5);
    assert!(matches!(decode(b"VGLH\x01\x03\x20"), Ok(None)));
    assert_eq!(malformed_at(b"VGLH\x01\x03\x21\x00"), 6);
    assert_eq!(malformed_at(b"VGLH\x01\x03\xff\xff"), 6);
    assert_eq!(
        malformed_at(b"VGLH\x01\x01\x39\x01"),
        6,
        "hello of 313 bytes"
    );
    assert_eq!(malformed_at(b"VGLH\x01\x02\x00\x00"), 6);
}

#[test]
fn the_decoder_refuses_bad_bodies_naming_the_offset() {
    let keys = ring(7, Some(8));
    let mut hello = Vec::new();
    let _ = Handshake::initiator(&keys, 1, 2, nonce(1), &mut hello);
    assert_eq!(hello.len(), MAX_HELLO_BYTES);
    let (message, used) = decode(&hello).unwrap().unwrap();
    assert_eq!(used, hello.len());
    let mut again = Vec::new();
    message.encode(&mut again);
    assert_eq!(again, hello);

    let mut bad = hello.clone();
    bad[HEADER_BYTES] = 0;
    bad[HEADER_BYTES + 1..HEADER_BYTES + 8].fill(0);
    assert_eq!(malformed_at(&bad), HEADER_BYTES, "from = 0");
    let mut bad = hello.clone();
    bad[HEADER_BYTES + 8..HEADER_BYTES + 16].fill(0);
    assert_eq!(malformed_at(&bad), HEADER_BYTES + 8, "to = 0");
    let mut bad = hello.clone();
    bad[HEADER_BYTES + 48] = 1;
    assert_eq!(malformed_at(&bad), HEADER_BYTES + 48, "count disagrees");
    let mut bad = hello.clone();
    bad[HEADER_BYTES + 48] = 0;
    assert_eq!(malformed_at(&bad), HEADER_BYTES + 48, "no keys");
    let mut bad = hello.clone();
    let first = HEADER_BYTES + HELLO_FIXED_BYTES;
    let copy: [u8; KEY_ID_BYTES] = array_at(&bad, first);
    bad[first + KEY_ID_BYTES..].copy_from_slice(&copy);
    assert_eq!(malformed_at(&bad), first, "the same key twice");
}
