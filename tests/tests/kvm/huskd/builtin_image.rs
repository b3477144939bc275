//! The built-in image: huskd imports the busybox that the pod initramfs carries into its
//! store at start, so with nothing pulled ListImages and ImageStatus show it, PullImage of
//! it contacts no registry, and `huskctl run` (the README's demo) runs a pod on it and
//! prints the container's CRI log; huskd's metrics count that pod's start.
use std::process::Command;

use husk_cri::image::builtin::BUILTIN_IMAGE;
use k8s_cri::v1 as cri;

use super::Fixture;

#[test]
fn a_pod_runs_on_the_built_in_image_with_nothing_pulled() {
    let f = Fixture::start();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let mut c = f.huskd.connect();
        let images = c
            .img
            .list_images(cri::ListImagesRequest::default())
            .await
            .expect("ListImages")
            .into_inner()
            .images;
        assert_eq!(images.len(), 1, "{images:?}");
        assert_eq!(images[0].repo_tags, [BUILTIN_IMAGE]);
        assert!(images[0].size > 1 << 20, "busybox is in it: {images:?}");
        let spec = |image: &str| {
            Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            })
        };
        // kubelet's short form finds it too, and an "Always" pull gets the same image.
        let st = c
            .img
            .image_status(cri::ImageStatusRequest {
                image: spec("husk.local/busybox"),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner();
        assert_eq!(st.image.map(|i| i.id), Some(images[0].id.clone()));
        let pulled = c
            .img
            .pull_image(cri::PullImageRequest {
                image: spec(BUILTIN_IMAGE),
                ..Default::default()
            })
            .await
            .expect("PullImage of the built-in image")
            .into_inner();
        assert_eq!(pulled.image_ref, images[0].id);
        let e = c
            .img
            .pull_image(cri::PullImageRequest {
                image: spec("husk.local/nginx:1"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("built in"), "{e:?}");
    });
    f.lap("the built-in image is listed, found and \"pulled\" locally");

    let out = Command::new(husk_tests::bin_dir().join("huskctl"))
        .arg("--socket")
        .arg(&f.huskd.socket)
        .args(["run", "--name", "demo", "--"])
        .args(["sh", "-c", "echo from the built-in image; hostname; exit 3"])
        .output()
        .expect("run huskctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{stderr}\n{}",
        f.huskd.log()
    );
    assert!(
        stdout.contains(" stdout F from the built-in image\n")
            && stdout.contains(" stdout F demo\n")
            && stdout.contains("--- exit code 3"),
        "{stdout}"
    );
    f.lap("huskctl ran a pod on it and removed it");
    // huskd's metrics saw that pod start, its VM boot, and nothing fail.
    let metrics = f.huskd.scrape_metrics();
    for (name, want) in [
        ("huskd_pod_start_seconds_count", "1"),
        ("huskd_vm_boot_seconds_count", "1"),
        ("huskd_pod_start_failures_total", "0"),
        ("huskd_cni_errors_total", "0"),
        ("huskd_pods{state=\"ready\"}", "0"),
        ("huskd_containers{state=\"running\"}", "0"),
    ] {
        assert!(
            metrics.lines().any(|l| l == format!("{name} {want}")),
            "{name} {want}:\n{metrics}"
        );
    }
    rt.block_on(async {
        super::assert_nothing_left(&mut f.huskd.connect(), &f.huskd, &f.netns_before).await
    });
    f.finish();
}
