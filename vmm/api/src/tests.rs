//! The wire format, without sockets (the VMM's server tests cover the socket side).

use serde_json::json;

use super::*;

fn configure() -> Request {
    Request::Configure(MachineConfig {
        kernel: "/boot/vmlinux".into(),
        initramfs: Some("/boot/initrd".into()),
        cmdline: Some("console=ttyS0 quiet".into()),
        mem_mib: 512,
        vcpus: 2,
        serial: SerialConfig::File("/var/log/vm.log".into()),
    })
}

#[test]
fn documented_examples_parse() {
    let examples = [
        r#"{"op":"configure","kernel":"/path/vmlinux","initramfs":"/path/initrd","cmdline":"console=ttyS0","mem_mib":512,"vcpus":2,"serial":"stdout"}"#,
        r#"{"op":"configure","kernel":"/k","mem_mib":128,"vcpus":1,"serial":{"file":"/path/log"}}"#,
        r#"{"op":"add_block","path":"/path/disk.img","read_only":false,"id":"rootfs"}"#,
        r#"{"op":"add_net","tap_name":"tap0","mac":"02:00:00:00:00:01"}"#,
        r#"{"op":"add_net","tap_fd":0}"#,
        r#"{"op":"add_fs","socket_path":"/run/virtiofsd.sock","tag":"shared"}"#,
        r#"{"op":"add_vsock","guest_cid":3,"uds_path":"/run/husk/vsock.sock"}"#,
        r#"{"op":"start"}"#,
        r#"{"op":"pause"}"#,
        r#"{"op":"resume"}"#,
        r#"{"op":"shutdown"}"#,
        r#"{"op":"status"}"#,
    ];
    for text in examples {
        let req: Request = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        // And back: what we send is what we parse.
        let again: Request = serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        assert_eq!(req, again);
    }
    let req: Request = serde_json::from_str(examples[0]).unwrap();
    assert_eq!(
        req,
        Request::Configure(MachineConfig {
            kernel: "/path/vmlinux".into(),
            initramfs: Some("/path/initrd".into()),
            cmdline: Some("console=ttyS0".into()),
            mem_mib: 512,
            vcpus: 2,
            serial: SerialConfig::Stdout,
        })
    );
}

#[test]
fn serial_forms() {
    let parse = |v| serde_json::from_value::<SerialConfig>(v);
    assert_eq!(parse(json!("stdout")).unwrap(), SerialConfig::Stdout);
    assert_eq!(parse(json!("none")).unwrap(), SerialConfig::Disabled);
    assert_eq!(
        parse(json!({"file": "/l"})).unwrap(),
        SerialConfig::File("/l".into())
    );
    assert!(parse(json!("file")).is_err());
    assert!(parse(json!({"file": "/l", "x": 1})).is_err());
    assert_eq!(
        serde_json::to_value(SerialConfig::Disabled).unwrap(),
        json!("none")
    );
}

#[test]
fn mac_addresses() {
    assert_eq!(
        MacAddr::parse("02:AB:cd:00:00:ff").unwrap(),
        MacAddr([2, 0xab, 0xcd, 0, 0, 0xff])
    );
    assert_eq!(
        MacAddr([2, 0xab, 0, 0, 0, 1]).to_string(),
        "02:ab:00:00:00:01"
    );
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "2:00:00:00:00:0001",
        "02-00-00-00-00-01",
        "zz:00:00:00:00:00",
        "02:00:00:00:00:+1",
    ] {
        assert!(MacAddr::parse(bad).is_err(), "{bad}");
    }
    assert!(MacAddr::parse("01:00:5e:00:00:01")
        .unwrap_err()
        .contains("multicast"));
    let e = serde_json::from_str::<Request>(r#"{"op":"add_net","tap_name":"t","mac":"nope"}"#)
        .unwrap_err();
    assert!(e.to_string().contains("invalid MAC address"), "{e}");
}

#[test]
fn validation() {
    let net = |tap_name: Option<&str>, tap_fd| {
        Request::AddNet(NetConfig {
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            tap_name: tap_name.map(Into::into),
            tap_fd,
            mac: None,
        })
    };
    assert!(net(Some("tap0"), None).validate(0).is_ok());
    assert!(net(None, Some(1)).validate(2).is_ok());
    assert!(net(Some("tap0"), Some(0))
        .validate(1)
        .unwrap_err()
        .contains("not both"));
    assert!(net(None, None)
        .validate(0)
        .unwrap_err()
        .contains("give tap_name"));
    assert!(net(Some(""), None).validate(0).is_err());
    assert!(net(Some("a-name-that-is-too-long"), None)
        .validate(0)
        .is_err());
    assert!(net(Some("tap0"), None)
        .validate(1)
        .unwrap_err()
        .contains("takes no file descriptors"));
    let Request::Configure(mut c) = configure() else {
        unreachable!()
    };
    c.vcpus = 0;
    assert!(Request::Configure(c.clone())
        .validate(0)
        .unwrap_err()
        .contains("vcpus"));
    c.vcpus = 1;
    c.mem_mib = 0;
    assert!(Request::Configure(c)
        .validate(0)
        .unwrap_err()
        .contains("configure: mem_mib"));
    let block = |id: &str| {
        Request::AddBlock(BlockConfig {
            rate_limiter: None,
            path: "/disk.img".into(),
            read_only: false,
            id: Some(id.into()),
        })
    };
    assert!(block("rootfs").validate(0).is_ok());
    assert!(block(&"x".repeat(20)).validate(0).is_ok());
    assert!(block(&"x".repeat(21))
        .validate(0)
        .unwrap_err()
        .starts_with("add_block: id"));
    assert!(block("").validate(0).is_err());
    assert!(block("a\nb").validate(0).is_err());
}

#[test]
fn response_and_status_shapes() {
    assert_eq!(
        serde_json::to_value(Response::ok()).unwrap(),
        json!({"ok": true, "result": {}})
    );
    assert_eq!(
        serde_json::to_value(Response::error("no kernel: send configure first")).unwrap(),
        json!({"ok": false, "error": "no kernel: send configure first"})
    );
    let status = VmStatus {
        state: VmState::Exited,
        exit_reason: Some(ExitReason::GuestPanic),
        boot_ms: Some(87),
    };
    assert_eq!(
        serde_json::to_value(Response::ok_with(&status)).unwrap(),
        json!({"ok": true, "result": {"state": "exited", "exit_reason": "guest_panic", "boot_ms": 87}})
    );
    assert_eq!(
        serde_json::to_value(VmStatus {
            state: VmState::Configuring,
            exit_reason: None,
            boot_ms: None
        })
        .unwrap(),
        json!({"state": "configuring"})
    );
    // A newer VMM's reason and extra fields do not break an older client.
    let newer: VmStatus = serde_json::from_value(
        json!({"state": "exited", "exit_reason": "oom_killed", "cpu_ms": 3}),
    )
    .unwrap();
    assert_eq!(newer.exit_reason, Some(ExitReason::Unknown));
}
