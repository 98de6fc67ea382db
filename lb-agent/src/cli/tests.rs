use super::*;
use crate::status::fixtures;

#[test]
fn counts_and_rates_are_short() {
    assert_eq!(count(0), "0");
    assert_eq!(count(99_999), "99999");
    assert_eq!(count(123_456), "123.5K");
    assert_eq!(count(7_000_000_000), "7.0G");
    assert_eq!(rate(0.0), "0.0");
    assert_eq!(rate(999.94), "999.9");
    assert_eq!(rate(1_500_000.0), "1.5M");
}

#[test]
fn the_status_table_of_a_known_state() {
    let json = fixtures::snapshot().to_json(&fixtures::traffic());
    let table = render(&json);
    let expected = "\
SERVICE / BACKEND           WEIGHT  HEALTH     CONNS  PKTS IN  PKTS OUT  BYTES IN  BYTES OUT  CONN/S  PPS IN  PPS OUT  BIT/S IN  BIT/S OUT
web tcp 198.18.100.10:80            http          20      120       100      7200     100.0K     2.0    12.5     10.0      6.0K      80.0K
  -> 198.18.1.11:8080       1       up            20      120       100      7200     100.0K     2.0    12.5     10.0      6.0K      80.0K
  -> 198.18.1.12:8080       1       down, out      0        0         0         0          0     0.0     0.0      0.0       0.0        0.0
plain tcp 198.18.100.10:81          no check       -        -         -         -          -       -       -        -         -          -
  -> [fd00:1::11]:8080      1       -              -        -         -         -          -       -       -        -         -          -
";
    assert_eq!(table, expected, "got:\n{table}");
}

#[test]
fn failing_and_failing_open_services_say_so() {
    let mut snap = fixtures::snapshot();
    std::sync::Arc::make_mut(&mut snap.services[0]).mode = HealthMode::FailOpen;
    let mut json = snap.to_json(&fixtures::traffic());
    json.services[0].backends[1].last_failure = Some(crate::status::FailureJson {
        reason: "timeout".into(),
        detail: "no answer in 500ms".into(),
        at: "2026-11-27T20:00:00.000Z".into(),
    });
    let table = render(&json);
    assert!(table.contains("http, FAIL-OPEN"), "{table}");
    assert!(table.contains("down: timeout, out"), "{table}");
    assert_eq!(
        render(&ServicesJson {
            services: vec![],
            left_out: vec![],
        }),
        format!("{}\n(no services)\n", HEADER.join("  "))
    );
    // A service that does not fit the data plane is named below the table, with why.
    let out = render(&ServicesJson {
        services: vec![],
        left_out: vec![crate::status::LeftOutJson {
            name: "shop/huge".into(),
            limit: "source_ranges".into(),
            reason: "its 20000 source-range prefixes do not fit".into(),
            kept_previous: true,
        }],
    });
    assert!(
        out.ends_with("left out: shop/huge (source_ranges; its previous version is served): its 20000 source-range prefixes do not fit\n"),
        "{out}"
    );
}
