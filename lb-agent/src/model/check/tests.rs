use std::collections::BTreeMap;

use super::*;

fn block(yaml: &str) -> Result<HealthCheck, Vec<SpecProblem>> {
    let raw: RawHealthCheck = serde_saphyr::from_str(yaml).expect("YAML");
    raw.check()
}

fn keys(r: Result<impl fmt::Debug, Vec<SpecProblem>>) -> Vec<String> {
    r.expect_err("should be refused")
        .into_iter()
        .map(|p| p.key)
        .collect()
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_are_the_documented_ones() {
    let hc = block("type: tcp").unwrap();
    assert_eq!(hc.probe.kind, CheckKind::Tcp);
    assert_eq!(hc.probe.interval, Duration::from_secs(1));
    assert_eq!(hc.probe.timeout, Duration::from_millis(500));
    assert_eq!((hc.probe.rise, hc.probe.fall), (2, 2));
    assert_eq!(hc.port, None);
    assert!(!hc.fail_closed);
    // TCP: half-open unless a request is sent or a response read.
    assert_eq!(hc.probe.handshake, Handshake::Half);
    let payload = block("{type: tcp, request: x}").unwrap();
    assert_eq!(payload.probe.handshake, Handshake::Full);
    let full = block("{type: tcp, handshake: full}").unwrap();
    assert_eq!(full.probe.handshake, Handshake::Full);
    let http = block("type: http").unwrap();
    assert_eq!(http.probe.path, "/");
    assert_eq!(http.probe.expect_status, StatusRanges(vec![(200, 399)]));
    // A short interval without a timeout gets the interval as its timeout.
    let fast = block("{type: ping, interval: 100ms}").unwrap();
    assert_eq!(fast.probe.timeout, Duration::from_millis(100));
}

#[test]
fn the_full_block_parses() {
    let hc = block(
        "
type: https
port: 8443
interval: 250ms
timeout: 200ms
rise: 3
fall: 1
path: /healthz
host: example.internal
expect_status: 200,204,300-302
ca_file: /etc/weir/ca.pem
fail_closed: true
",
    )
    .unwrap();
    assert_eq!(hc.port, Some(8443));
    assert_eq!(hc.probe.interval, Duration::from_millis(250));
    assert_eq!(hc.probe.timeout, Duration::from_millis(200));
    assert_eq!((hc.probe.rise, hc.probe.fall), (3, 1));
    assert_eq!(hc.probe.host.as_deref(), Some("example.internal"));
    assert_eq!(hc.probe.expect_status.to_string(), "200,204,300-302");
    assert!(hc.probe.expect_status.contains(204));
    assert!(!hc.probe.expect_status.contains(203));
    assert!(hc.fail_closed);
    let udp = block("{type: udp, request: \"ping\\n\", response: pong}").unwrap();
    assert_eq!(udp.probe.request.as_deref(), Some("ping\n"));
}

#[test]
fn bad_values_name_their_key() {
    assert_eq!(keys(block("{type: tcp, interval: 5ms}")), ["interval"]);
    assert_eq!(keys(block("{type: tcp, interval: 2h}")), ["interval"]);
    assert_eq!(
        keys(block("{type: tcp, interval: 1s, timeout: 2s}")),
        ["timeout"]
    );
    assert_eq!(keys(block("{type: tcp, timeout: 0s}")), ["timeout"]);
    assert_eq!(
        keys(block("{type: tcp, rise: 0, fall: 101}")),
        ["rise", "fall"]
    );
    assert_eq!(keys(block("{type: tcp, port: 0}")), ["port"]);
    assert_eq!(keys(block("{type: ping, port: 80}")), ["port"]);
    assert_eq!(keys(block("{type: tcp, path: /x}")), ["path"]);
    assert_eq!(keys(block("{type: http, path: x}")), ["path"]);
    assert_eq!(keys(block("{type: http, host: \"a b\"}")), ["host"]);
    assert_eq!(keys(block("{type: http, request: x}")), ["request"]);
    assert_eq!(keys(block("{type: http, ca_file: /x}")), ["ca_file"]);
    assert_eq!(keys(block("{type: sctp, response: x}")), ["response"]);
    assert_eq!(keys(block("{type: udp}")), ["request"]);
    assert_eq!(
        keys(block("{type: tcp, handshake: half, request: x}")),
        ["handshake"]
    );
    assert_eq!(keys(block("{type: http, handshake: full}")), ["handshake"]);
    assert!(serde_saphyr::from_str::<RawHealthCheck>("{type: tcp, handshake: syn}").is_err());
    assert_eq!(keys(block("{type: udp, request: \"\"}")), ["request"]);
    for bad in ["99", "200-600", "300-200", "abc", "200,"] {
        let r = block(&format!("{{type: http, expect_status: \"{bad}\"}}"));
        assert_eq!(keys(r), ["expect_status"], "{bad}");
    }
    // Unknown fields and types are refused by the parser itself.
    assert!(serde_saphyr::from_str::<RawHealthCheck>("{type: tcp, intervall: 1s}").is_err());
    assert!(serde_saphyr::from_str::<RawHealthCheck>("{type: icmp6}").is_err());
    let p = block("{type: tcp, interval: 5ms}").unwrap_err();
    assert_eq!(p[0].to_string(), "interval: 5ms is outside 10ms..1h");
}

#[test]
fn annotations_give_the_same_check_as_the_block() {
    let a = annotations(&[
        ("weir.dev/health-check", "http"),
        ("weir.dev/health-check-port", "8080"),
        ("weir.dev/health-check-interval", "100ms"),
        ("weir.dev/health-check-timeout", "80ms"),
        ("weir.dev/health-check-rise", "2"),
        ("weir.dev/health-check-fall", "3"),
        ("weir.dev/health-check-path", "/healthz"),
        ("weir.dev/health-check-host", "example.internal"),
        ("weir.dev/health-check-expect-status", "200-299"),
    ]);
    let from_annotations = from_annotations(&a, Protocol::Tcp).unwrap().unwrap();
    let from_block = block(
        "{type: http, port: 8080, interval: 100ms, timeout: 80ms, rise: 2, fall: 3, \
          path: /healthz, host: example.internal, expect_status: 200-299}",
    )
    .unwrap();
    assert_eq!(from_annotations, from_block);
    let a = annotations(&[
        ("weir.dev/health-check", "tcp"),
        ("weir.dev/health-check-handshake", "full"),
    ]);
    let handshake = super::from_annotations(&a, Protocol::Tcp).unwrap().unwrap();
    assert_eq!(Some(handshake), block("{type: tcp, handshake: full}").ok());
}

#[test]
fn no_annotation_no_check() {
    assert_eq!(from_annotations(&annotations(&[]), Protocol::Tcp), Ok(None));
    let none = annotations(&[("weir.dev/health-check", "none")]);
    assert_eq!(from_annotations(&none, Protocol::Tcp), Ok(None));
    let off = annotations(&[("loxilb.io/liveness", "no")]);
    assert_eq!(from_annotations(&off, Protocol::Tcp), Ok(None));
    // A setting without the type is most likely a forgotten type: say so.
    let orphan = annotations(&[("weir.dev/health-check-interval", "1s")]);
    assert_eq!(
        keys(from_annotations(&orphan, Protocol::Tcp)),
        ["weir.dev/health-check-interval"]
    );
}

#[test]
fn loxilb_aliases_are_accepted() {
    let a = annotations(&[
        ("loxilb.io/liveness", "yes"),
        ("loxilb.io/probetype", "udp"),
        ("loxilb.io/probeport", "5353"),
        ("loxilb.io/probereq", "ping\n"),
        ("loxilb.io/proberesp", "pong"),
        ("loxilb.io/probetimeout", "10"),
        ("loxilb.io/proberetries", "3"),
    ]);
    let hc = from_annotations(&a, Protocol::Udp).unwrap().unwrap();
    assert_eq!(hc.probe.kind, CheckKind::Udp);
    assert_eq!(hc.port, Some(5353));
    // Payloads keep their whitespace.
    assert_eq!(hc.probe.request.as_deref(), Some("ping\n"));
    assert_eq!(hc.probe.response.as_deref(), Some("pong"));
    // LoxiLB's probetimeout is its probe interval, in seconds.
    assert_eq!(hc.probe.interval, Duration::from_secs(10));
    assert_eq!(hc.probe.timeout, DEFAULT_TIMEOUT);
    assert_eq!(hc.probe.fall, 3);

    // liveness alone checks with the service's protocol.
    let live = annotations(&[("loxilb.io/liveness", "yes")]);
    for (protocol, kind) in [
        (Protocol::Tcp, CheckKind::Tcp),
        (Protocol::Sctp, CheckKind::Sctp),
    ] {
        let hc = from_annotations(&live, protocol).unwrap().unwrap();
        assert_eq!(hc.probe.kind, kind);
    }
    // ...but a UDP check needs a request, which LoxiLB would not have asked for.
    assert_eq!(
        keys(from_annotations(&live, Protocol::Udp)),
        ["weir.dev/health-check-request"]
    );
    let none = annotations(&[
        ("loxilb.io/liveness", "yes"),
        ("loxilb.io/probetype", "none"),
    ]);
    assert_eq!(from_annotations(&none, Protocol::Tcp), Ok(None));
}

#[test]
fn weir_annotations_win_over_aliases() {
    let a = annotations(&[
        ("weir.dev/health-check", "tcp"),
        ("weir.dev/health-check-port", "81"),
        ("weir.dev/health-check-interval", "200ms"),
        ("weir.dev/health-check-fall", "4"),
        ("loxilb.io/liveness", "yes"),
        ("loxilb.io/probetype", "ping"),
        ("loxilb.io/probeport", "82"),
        ("loxilb.io/probetimeout", "60"),
        ("loxilb.io/proberetries", "1"),
    ]);
    let hc = from_annotations(&a, Protocol::Tcp).unwrap().unwrap();
    assert_eq!(hc.probe.kind, CheckKind::Tcp);
    assert_eq!(hc.port, Some(81));
    assert_eq!(hc.probe.interval, Duration::from_millis(200));
    assert_eq!(hc.probe.fall, 4);
}

#[test]
fn bad_annotations_name_the_annotation() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("weir.dev/health-check", "gopher")],
            &["weir.dev/health-check"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-handshake", "syn"),
            ],
            &["weir.dev/health-check-handshake"],
        ),
        (
            &[("loxilb.io/probetype", "gopher")],
            &["loxilb.io/probetype"],
        ),
        (&[("loxilb.io/liveness", "maybe")], &["loxilb.io/liveness"]),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-port", "http"),
            ],
            &["weir.dev/health-check-port"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("loxilb.io/probeport", "70000"),
            ],
            &["loxilb.io/probeport"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-interval", "soon"),
            ],
            &["weir.dev/health-check-interval"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("loxilb.io/probetimeout", "1.5"),
            ],
            &["loxilb.io/probetimeout"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-rise", "-1"),
            ],
            &["weir.dev/health-check-rise"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("loxilb.io/proberetries", "0"),
            ],
            &["loxilb.io/proberetries"],
        ),
        (
            &[
                ("weir.dev/health-check", "http"),
                ("weir.dev/health-check-expect-status", "ok"),
            ],
            &["weir.dev/health-check-expect-status"],
        ),
        (
            &[
                ("weir.dev/health-check", "ping"),
                ("loxilb.io/probeport", "80"),
            ],
            &["loxilb.io/probeport"],
        ),
        (
            &[
                ("loxilb.io/liveness", "yes"),
                ("loxilb.io/probetimeout", "7200"),
            ],
            &["loxilb.io/probetimeout"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-path", "/x"),
            ],
            &["weir.dev/health-check-path"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-fail-closed", "si"),
            ],
            &["weir.dev/health-check-fail-closed"],
        ),
        (
            &[
                ("weir.dev/health-check", "tcp"),
                ("weir.dev/health-check-interval", "1s"),
                ("weir.dev/health-check-timeout", "2s"),
            ],
            &["weir.dev/health-check-timeout"],
        ),
    ];
    for (pairs, want) in cases {
        let got = keys(from_annotations(&annotations(pairs), Protocol::Tcp));
        assert_eq!(&got, want, "{pairs:?}");
    }
    let fail_closed = annotations(&[
        ("weir.dev/health-check", "ping"),
        ("weir.dev/health-check-fail-closed", "true"),
    ]);
    assert!(
        from_annotations(&fail_closed, Protocol::Tcp)
            .unwrap()
            .unwrap()
            .fail_closed
    );
}
