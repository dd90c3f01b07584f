use super::*;

const ISS: &str = "secure-egress-control";
const AUD: &str = "egress-proxy";

struct Fixture {
    pair: KeyPair,
    signer: Signer,
    verifier: Verifier,
}

fn fixture_with_leeway(leeway: u64) -> Fixture {
    let pair = KeyPair::generate("k1").unwrap();
    let signer = Signer::from_pem(pair.private_pem.as_bytes(), "k1", ISS, AUD).unwrap();
    let jwks = Jwks::parse(&pair.jwks().to_string()).unwrap();
    Fixture {
        pair,
        signer,
        verifier: Verifier::new(jwks, ISS, AUD, leeway),
    }
}

fn fixture() -> Fixture {
    fixture_with_leeway(0)
}

fn request(hosts: &[&str]) -> MintRequest {
    MintRequest {
        limits: Default::default(),
        organization_uuid: None,
        enforce: Default::default(),
        credentials: Vec::new(),
        container_id: "sandbox_1".into(),
        user_id: "alice".into(),
        allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
        ttl: Duration::from_secs(3600),
    }
}

fn claims(f: &Fixture) -> Claims {
    f.signer.mint(&request(&["a.test"])).unwrap().claims
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn minted_tokens_verify_and_carry_the_contract_claims() {
    let f = fixture();
    let minted = f
        .signer
        .mint(&request(&["api.example.test", "*.wild.test:8443"]))
        .unwrap();
    let grant = f.verifier.verify(&minted.token).unwrap();
    assert_eq!(grant.claims.container_id, "sandbox_1");
    assert_eq!(grant.allowlist.entries().len(), 2);
    // The payload is the original design's shape: allowed_hosts a string,
    // flags as strings.
    let payload = minted.token.split('.').nth(1).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(json["allowed_hosts"], "api.example.test,*.wild.test:8443");
    assert_eq!(json["enforce_container_binding"], "true");
    assert_eq!(json["aud"], AUD);
    assert_eq!(
        json["exp"].as_u64().unwrap() - json["iat"].as_u64().unwrap(),
        3600
    );
}

#[test]
fn the_second_verification_comes_from_the_cache() {
    let f = fixture();
    let token = f.signer.mint(&request(&["a.test"])).unwrap().token;
    let a = f.verifier.verify(&token).unwrap();
    let b = f.verifier.verify(&token).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn an_array_of_hosts_is_accepted() {
    let f = fixture();
    let mut c = claims(&f);
    c.allowed_hosts = HostList(vec!["x.test".into()]);
    let token = f.signer.sign(&c).unwrap();
    // Re-encode with allowed_hosts as a JSON array.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    json["allowed_hosts"] = serde_json::json!(["x.test", "y.test"]);
    parts[1] = b64(&json);
    let unsigned = format!("{}.{}", parts[0], parts[1]);
    // Sign the new payload properly.
    let reparsed: Claims = serde_json::from_value(json).unwrap();
    assert_eq!(reparsed.allowed_hosts.0, vec!["x.test", "y.test"]);
    let token = f.signer.sign(&reparsed).unwrap();
    assert!(f.verifier.verify(&token).is_ok());
    assert!(
        f.verifier
            .verify(&format!("{unsigned}.{}", parts[2]))
            .is_err()
    );
}

#[test]
fn expiry_nbf_and_iat_are_checked() {
    let f = fixture();
    let now = now_s();
    let mut c = claims(&f);
    c.exp = now - 10;
    let t = f.signer.sign(&c).unwrap();
    assert!(matches!(f.verifier.verify(&t), Err(TokenError::Expired)));
    assert_eq!(TokenError::Expired.deny(), Deny::TokenExpired);

    let mut c = claims(&f);
    c.nbf = Some(now + 600);
    let t = f.signer.sign(&c).unwrap();
    assert!(matches!(
        f.verifier.verify(&t),
        Err(TokenError::NotYetValid)
    ));

    let mut c = claims(&f);
    c.iat = now + 600;
    let t = f.signer.sign(&c).unwrap();
    assert!(matches!(
        f.verifier.verify(&t),
        Err(TokenError::IssuedInFuture)
    ));
}

#[test]
fn leeway_is_ours_not_the_crates() {
    // jsonwebtoken's default leeway is 60 s; with ours at 30 s a token that
    // expired 45 s ago is refused.
    let f = fixture_with_leeway(30);
    let mut c = claims(&f);
    c.exp = now_s() - 45;
    assert!(matches!(
        f.verifier.verify(&f.signer.sign(&c).unwrap()),
        Err(TokenError::Expired)
    ));
    c.exp = now_s() - 10;
    assert!(f.verifier.verify(&f.signer.sign(&c).unwrap()).is_ok());
}

#[test]
fn a_cached_grant_still_expires() {
    let f = fixture();
    let mut c = claims(&f);
    c.exp = now_s() + 1;
    let t = f.signer.sign(&c).unwrap();
    assert!(f.verifier.verify(&t).is_ok());
    std::thread::sleep(Duration::from_millis(2100));
    assert!(matches!(f.verifier.verify(&t), Err(TokenError::Expired)));
}

#[test]
fn issuer_audience_and_required_claims() {
    let f = fixture();
    let mut c = claims(&f);
    c.iss = "someone-else".into();
    assert!(matches!(
        f.verifier.verify(&f.signer.sign(&c).unwrap()),
        Err(TokenError::BadIssuer)
    ));
    let mut c = claims(&f);
    c.aud = serde_json::json!("other");
    assert!(matches!(
        f.verifier.verify(&f.signer.sign(&c).unwrap()),
        Err(TokenError::BadAudience)
    ));
    let mut c = claims(&f);
    c.container_id = String::new();
    assert!(matches!(
        f.verifier.verify(&f.signer.sign(&c).unwrap()),
        Err(TokenError::MissingClaim(_))
    ));
    let mut c = claims(&f);
    c.allowed_hosts = HostList(vec!["*".into()]);
    assert!(matches!(
        f.verifier.verify(&f.signer.sign(&c).unwrap()),
        Err(TokenError::BadAllowedHosts(..))
    ));

    // A token without exp, hand-made and validly signed.
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "k1"});
    let payload = serde_json::json!({"iss": ISS, "aud": AUD, "iat": now_s(), "jti": "x", "container_id": "c", "allowed_hosts": "a.test"});
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    let key = EncodingKey::from_ec_pem(f.pair.private_pem.as_bytes()).unwrap();
    let t = jsonwebtoken::encode(&h, &payload, &key).unwrap();
    let got = f.verifier.verify(&t);
    assert!(
        matches!(&got, Err(TokenError::MissingClaim(c)) if c == "exp"),
        "{header}: {got:?}"
    );
}

#[test]
fn algorithm_confusion_and_forgery_are_refused() {
    let f = fixture();
    let c = claims(&f);
    let payload = b64(&serde_json::to_value(&c).unwrap());

    let none = format!(
        "{}.{payload}.",
        b64(&serde_json::json!({"alg": "none", "kid": "k1"}))
    );
    assert!(matches!(f.verifier.verify(&none), Err(TokenError::BadAlgorithm(a)) if a == "none"));

    // HS256 keyed with the public key: the classic confusion attack.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &c,
        &EncodingKey::from_secret(f.pair.public_pem.as_bytes()),
    )
    .unwrap();
    assert!(matches!(
        f.verifier.verify(&hs),
        Err(TokenError::BadAlgorithm(_))
    ));

    let good = f.signer.sign(&c).unwrap();
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig_bytes[5] ^= 1;
    let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes));
    assert!(matches!(
        f.verifier.verify(&tampered),
        Err(TokenError::BadSignature) | Err(TokenError::Malformed(_))
    ));

    let mut c2 = c.clone();
    c2.allowed_hosts = HostList(vec!["evil.test".into()]);
    let swapped = format!(
        "{}.{}.{}",
        good.split('.').next().unwrap(),
        b64(&serde_json::to_value(&c2).unwrap()),
        sig
    );
    assert!(matches!(
        f.verifier.verify(&swapped),
        Err(TokenError::BadSignature)
    ));

    let other = fixture();
    let foreign = Signer::from_pem(other.pair.private_pem.as_bytes(), "k1", ISS, AUD)
        .unwrap()
        .sign(&c)
        .unwrap();
    assert!(matches!(
        f.verifier.verify(&foreign),
        Err(TokenError::BadSignature)
    ));
}

#[test]
fn kid_is_required_and_looked_up() {
    let f = fixture();
    let c = claims(&f);
    let key = EncodingKey::from_ec_pem(f.pair.private_pem.as_bytes()).unwrap();
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &c, &key).unwrap();
    assert!(matches!(
        f.verifier.verify(&no_kid),
        Err(TokenError::MissingKid)
    ));
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k2".into());
    let wrong_kid = jsonwebtoken::encode(&h, &c, &key).unwrap();
    assert!(matches!(f.verifier.verify(&wrong_kid), Err(TokenError::UnknownKid(k)) if k == "k2"));
}

#[test]
fn a_jwks_with_two_keys_verifies_both() {
    let a = KeyPair::generate("old").unwrap();
    let b = KeyPair::generate("new").unwrap();
    let jwks = serde_json::json!({"keys": [a.jwk, b.jwk]});
    let verifier = Verifier::new(Jwks::parse(&jwks.to_string()).unwrap(), ISS, AUD, 0);
    for (pair, kid) in [(&a, "old"), (&b, "new")] {
        let s = Signer::from_pem(pair.private_pem.as_bytes(), kid, ISS, AUD).unwrap();
        let t = s.mint(&request(&["a.test"])).unwrap().token;
        assert!(verifier.verify(&t).is_ok(), "{kid}");
    }
    // Dropping the old key from the set refuses its tokens, even cached ones.
    let s = Signer::from_pem(a.private_pem.as_bytes(), "old", ISS, AUD).unwrap();
    let t = s.mint(&request(&["a.test"])).unwrap().token;
    assert!(verifier.verify(&t).is_ok());
    verifier.set_jwks(Jwks::parse(&b.jwks().to_string()).unwrap());
    assert!(matches!(
        verifier.verify(&t),
        Err(TokenError::UnknownKid(_))
    ));
}

#[test]
fn bad_jwks_are_refused() {
    for bad in [
        "",
        "{}",
        r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r"}]}"#,
        r#"{"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "p"}]}"#,
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#,
    ] {
        assert!(Jwks::parse(bad).is_err(), "{bad}");
    }
    let a = KeyPair::generate("same").unwrap();
    let twice = serde_json::json!({"keys": [a.jwk, a.jwk]});
    assert!(Jwks::parse(&twice.to_string()).is_err());
}

#[test]
fn hostile_token_strings_fail_cleanly() {
    let f = fixture();
    for t in [
        "",
        ".",
        "..",
        "a.b.c",
        "a.b",
        "€.€.€",
        "eyJhbGciOiJFUzI1NiJ9..",
        &"A".repeat(MAX_TOKEN_BYTES + 1),
    ] {
        assert!(f.verifier.verify(t).is_err(), "{t:.40}");
    }
    assert!(matches!(
        f.verifier.verify(&"A".repeat(MAX_TOKEN_BYTES + 1)),
        Err(TokenError::TooLarge)
    ));
}

#[test]
fn minting_refuses_what_it_should() {
    let f = fixture();
    for hosts in [
        &["*"][..],
        &["a.test", "*"],
        &[],
        &["a b.test"],
        &["*.*.test"],
        &["*.com"],
        &["a.test", "*.co.uk"],
        &["0.0.0.0"],
    ] {
        assert!(f.signer.mint(&request(hosts)).is_err(), "{hosts:?}");
    }
    // A token no verifier would accept (over 8 KiB) is refused at mint,
    // with the reason; one just under is minted and verifies.
    let many: Vec<String> = (0..400)
        .map(|i| format!("host-{i:04}.example.test"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    match f.signer.mint(&request(&many)) {
        Err(MintError::BadRequest(why)) => assert!(why.contains("8192-byte limit"), "{why}"),
        other => panic!("{:?}", other.map(|m| m.token.len())),
    }
    let fewer = &many[..200];
    let minted = f.signer.mint(&request(fewer)).unwrap();
    assert!(
        minted.token.len() <= MAX_TOKEN_BYTES,
        "{}",
        minted.token.len()
    );
    assert!(f.verifier.verify(&minted.token).is_ok());
    let mut r = request(&["a.test"]);
    r.user_id = "../etc".into();
    assert!(f.signer.mint(&r).is_err());
    let mut r = request(&["a.test"]);
    r.ttl = Duration::ZERO;
    assert!(f.signer.mint(&r).is_err());
}

#[test]
fn key_pairs_round_trip_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let pair = KeyPair::generate("disk").unwrap();
    pair.write(dir.path()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("private-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let reloaded = KeyPair::from_private_pem(
        &std::fs::read_to_string(dir.path().join("private-key.pem")).unwrap(),
        "disk",
    )
    .unwrap();
    assert_eq!(reloaded.jwk, pair.jwk);
    let jwks = Jwks::load(&dir.path().join("jwks.json")).unwrap();
    assert_eq!(jwks.len(), 1);
    // Writing again does not overwrite a private key.
    assert!(pair.write(dir.path()).is_err());
}

#[test]
fn revoked_tokens_are_refused_and_their_watchers_cancelled() {
    let f = fixture();
    let minted = f.signer.mint(&request(&["a.test"])).unwrap();
    let grant = f.verifier.verify(&minted.token).unwrap();
    let watch = f.verifier.watch(&grant);
    assert!(!watch.is_cancelled());
    assert!(f.verifier.revoke(&minted.claims.jti, minted.claims.exp));
    assert!(
        !f.verifier.revoke(&minted.claims.jti, minted.claims.exp),
        "twice is not new"
    );
    assert!(watch.is_cancelled());
    // From the cache and uncached alike.
    assert!(matches!(
        f.verifier.verify(&minted.token),
        Err(TokenError::Revoked)
    ));
    assert_eq!(TokenError::Revoked.deny(), Deny::TokenRevoked);
    assert!(f.verifier.watch(&grant).is_cancelled());
    // Another token is untouched.
    let other = f.signer.mint(&request(&["a.test"])).unwrap();
    assert!(f.verifier.verify(&other.token).is_ok());
    // Once the token has expired anyway, the revocation is forgotten.
    assert!(f.verifier.purge_expired(now_s()).is_empty());
    assert_eq!(
        f.verifier.purge_expired(minted.claims.exp + 1),
        vec![minted.claims.jti.clone()]
    );
    assert!(f.verifier.revoked().is_empty());
}

#[test]
fn a_replacement_of_the_same_container_takes_over_the_watch_and_no_other_does() {
    let f = fixture();
    let old = f.signer.mint(&request(&["a.test"])).unwrap();
    let old_grant = f.verifier.verify(&old.token).unwrap();
    let watch = f.verifier.watch(&old_grant);
    let new = f.signer.mint(&request(&["b.test"])).unwrap();
    let new_grant = f.verifier.verify(&new.token).unwrap();
    f.verifier.rekey(&old.claims.jti, &new_grant);
    f.verifier.revoke(&old.claims.jti, old.claims.exp);
    assert!(!watch.is_cancelled(), "the old token's revocation kept it");
    f.verifier.revoke(&new.claims.jti, new.claims.exp);
    assert!(watch.is_cancelled(), "the new token's revocation closes it");

    // Another container's token (a hostile peer's replacement naming this
    // jti) takes over nothing: the watchers close.
    let victim = f.signer.mint(&request(&["a.test"])).unwrap();
    let victim_grant = f.verifier.verify(&victim.token).unwrap();
    let watch = f.verifier.watch(&victim_grant);
    let mut other = request(&["a.test"]);
    other.container_id = "sandbox_2".into();
    let other = f.signer.mint(&other).unwrap();
    let other_grant = f.verifier.verify(&other.token).unwrap();
    f.verifier.rekey(&victim.claims.jti, &other_grant);
    assert!(watch.is_cancelled());
}
