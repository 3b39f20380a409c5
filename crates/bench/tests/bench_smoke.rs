//! The benchmark harness runs end to end with tiny settings and reports every figure. Nothing
//! here is timed: it checks that each phase measured something.

use portcullis_bench::{Options, Scenario, run};

#[test]
fn every_phase_reports_its_figures() {
    let options = Options {
        connections: 3,
        rpcs: 5,
        concurrency: 2,
        seconds: 0.2,
        idle_connections: 2,
        rtt_ms: Some(4),
        rtt_connections: 2,
    };
    let mut phases = Vec::new();
    let report = run(&options, &mut |p| phases.push(p.phase)).unwrap();
    for scenario in Scenario::ALL {
        let s = &report.setup[scenario.name()];
        assert_eq!(s.n, 3, "{}", scenario.name());
        assert!(s.median_us > 0.0 && s.p99_us >= s.median_us);
    }
    for name in [
        "portcullis-totp",
        "portcullis-session",
        "portcullis-session-resumed",
    ] {
        assert!(report.setup_ratios_to_mtls[name] > 0.0, "{name}");
    }
    let rpc = report.rpc.as_ref().unwrap();
    assert_eq!((rpc.mtls.n, rpc.portcullis.n), (5, 5));
    let throughput = report.throughput.as_ref().unwrap();
    for name in ["mtls", "portcullis-totp", "portcullis-session"] {
        let t = &throughput.scenarios[name];
        assert!(t.handshakes_per_sec > 0.0, "{name}");
        assert_eq!(t.failures, 0, "{name}");
    }
    let rtt = report.rtt.as_ref().unwrap();
    // Through the proxy every setup takes at least two round trips (TCP, TLS).
    for (name, trips) in &rtt.round_trips {
        assert!(*trips >= 2.0, "{name}: {trips}");
    }
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "setup",
        "setup_ratios_to_mtls",
        "rpc",
        "throughput",
        "rss_bytes_per_idle_connection",
        "rtt",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    assert!(phases.contains(&"connections") && phases.contains(&"rtt"));
}
