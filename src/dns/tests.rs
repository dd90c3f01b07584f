use hickory_proto::op::Query;
use hickory_proto::rr::Name;

use super::*;

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

#[test]
fn hostile_messages_are_dropped_or_formerr() {
    // No header: dropped. A response: dropped.
    assert_eq!(parse(b"").unwrap_err(), None);
    assert_eq!(parse(&[0u8; 11]).unwrap_err(), None);
    let mut response = query("a.test.", RecordType::A).to_vec().unwrap();
    response[2] |= 0x80;
    assert_eq!(parse(&response).unwrap_err(), None);
    // Counts that lie, a truncated question, a compression loop, labels
    // past the end, oversized: FORMERR with the ID.
    let good = query("a.test.", RecordType::A).to_vec().unwrap();
    let mut lying = good.clone();
    lying[5] = 3;
    let mut more_answers = good.clone();
    more_answers[7] = 1;
    let cut = good[..good.len() - 3].to_vec();
    let looped = [&good[..12], &[0xc0, 12, 0, 1, 0, 1][..]].concat();
    let past_end = [&good[..12], &[63, b'a', b'b'][..]].concat();
    let oversized = [&good[..], &[0u8; MAX_QUERY][..]].concat();
    for bad in [lying, more_answers, cut, looped, past_end, oversized] {
        assert_eq!(parse(&bad).unwrap_err(), Some(7), "{bad:?}");
    }
    assert!(parse(&good).is_ok());
}

#[test]
fn answers_echo_the_question_and_truncate_to_the_client() {
    let mut req = query("MiXeD.Test.", RecordType::A);
    req.metadata.recursion_desired = true;
    let ips: Vec<std::net::Ipv4Addr> = (1..=60)
        .map(|i| std::net::Ipv4Addr::new(198, 18, 1, i))
        .collect();
    let small = respond(
        &req,
        &Answer::Addresses(ips[..2].to_vec(), 30),
        udp_limit(&req),
    );
    let m = Message::from_vec(&small).unwrap();
    assert_eq!(m.metadata.id, 7);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
    assert_eq!(m.queries[0].name().to_ascii(), "MiXeD.Test.");
    assert_eq!(m.answers.len(), 2);
    assert_eq!(m.answers[0].ttl, 30);
    assert!(m.edns.is_none(), "no EDNS asked, none given");
    // 60 records do not fit 512 bytes: TC, no records.
    let big = respond(&req, &Answer::Addresses(ips.clone(), 30), udp_limit(&req));
    assert!(big.len() <= 512);
    let m = Message::from_vec(&big).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // With EDNS the client's size (capped at 1232) is the limit, and EDNS
    // is echoed.
    let mut e = Edns::new();
    e.set_max_payload(4096);
    req.set_edns(e);
    assert_eq!(udp_limit(&req), usize::from(MAX_UDP_ANSWER));
    let m = Message::from_vec(&respond(
        &req,
        &Answer::Addresses(ips[..40].to_vec(), 30),
        udp_limit(&req),
    ))
    .unwrap();
    assert_eq!(m.answers.len(), 40);
    assert_eq!(m.edns.map(|e| e.max_payload()), Some(MAX_UDP_ANSWER));
    for (answer, code) in [
        (Answer::NxDomain, ResponseCode::NXDomain),
        (Answer::Refused, ResponseCode::Refused),
        (Answer::ServFail, ResponseCode::ServFail),
        (Answer::Empty, ResponseCode::NoError),
        (Answer::NotImp, ResponseCode::NotImp),
    ] {
        let m = Message::from_vec(&respond(&req, &answer, 512)).unwrap();
        assert_eq!((m.metadata.response_code, m.answers.len()), (code, 0));
    }
}

#[test]
fn query_type_labels_are_a_closed_set() {
    assert_eq!(qtype_label(RecordType::A), "A");
    assert_eq!(qtype_label(RecordType::HTTPS), "HTTPS");
    assert_eq!(qtype_label(RecordType::NULL), "other");
}

#[test]
fn an_unknown_edns_version_is_answered_badvers() {
    let mut q = query("api.test.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1);
    edns.set_max_payload(1232);
    q.set_edns(edns);
    let bytes = respond(&q, &Answer::BadVers, 512);
    let r = Message::from_vec(&bytes).unwrap();
    // 16 on the wire (hickory names 16 BADSIG when it reads it: the same
    // number, TSIG's name for it).
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0));
    assert!(r.answers.is_empty());
}
