//! huskd's Prometheus endpoint, scraped over plain HTTP as Prometheus does: off unless
//! configured, the text format with every family, counters that move with what happens
//! (a failed pull here; pod starts are checked in the lab's built-in-image test), and 404
//! for any other path.

mod support;

use std::net::TcpListener;

use k8s_cri::v1 as cri;
use support::{http_get as get, sample, Huskd};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_in_prometheus_text_format_and_count_what_happens() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let huskd = Huskd::start(&format!(
        "metrics_address = \"{addr}\"\n\
         [[huskd.registries]]\nhost = \"127.0.0.1:1\"\npolicy = \"allow-insecure\"\n"
    ));
    let (status, body) = get(addr, "/metrics");
    assert!(status.ends_with("200 OK"), "{status}");
    for family in [
        "huskd_pods",
        "huskd_containers",
        "huskd_pod_start_seconds",
        "huskd_vm_boot_seconds",
        "huskd_pod_start_failures_total",
        "huskd_image_pulls_total",
        "huskd_image_pull_failures_total",
        "huskd_image_pull_bytes_total",
        "huskd_cni_errors_total",
        "huskd_shim_errors_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family}:\n{body}"
        );
    }
    assert_eq!(sample(&body, "huskd_pods{state=\"ready\"}"), 0.0);
    assert_eq!(sample(&body, "huskd_containers{state=\"running\"}"), 0.0);
    assert_eq!(sample(&body, "huskd_pod_start_seconds_count"), 0.0);
    assert_eq!(
        sample(&body, "huskd_pod_start_seconds_bucket{le=\"+Inf\"}"),
        0.0
    );
    assert_eq!(sample(&body, "huskd_image_pull_failures_total"), 0.0);

    let mut c = huskd.connect();
    let e = c
        .img
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: "127.0.0.1:1/husk/none:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    let (_, body) = get(addr, "/metrics");
    assert_eq!(sample(&body, "huskd_image_pull_failures_total"), 1.0);
    assert_eq!(sample(&body, "huskd_image_pulls_total"), 0.0);

    let (status, _) = get(addr, "/other");
    assert!(status.ends_with("404 Not Found"), "{status}");
}
