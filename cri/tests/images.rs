//! huskd's ImageService against a real registry: images built here, pushed with
//! oci-client to Debian's docker-registry on 127.0.0.1, pulled through huskd's CRI socket.

mod support;

use std::io::Write;
use std::str::FromStr;

use k8s_cri::v1 as cri;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{CriClient, Huskd, Registry};
use tonic::Code;

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A tar of `(path, content or symlink target, is_symlink)` entries, mtime 0.
fn tar_of(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, link) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if *link {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                .unwrap();
        } else {
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

struct Pusher {
    client: Client,
}

impl Pusher {
    async fn new(host: &str) -> Pusher {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        client
            .store_auth_if_needed(host, &RegistryAuth::Anonymous)
            .await;
        Pusher { client }
    }

    async fn blob(&self, r: &Reference, data: &[u8]) -> String {
        let d = digest(data);
        self.client
            .push_blob(r, data.to_vec(), &d)
            .await
            .expect("push a blob");
        d
    }

    async fn manifest(&self, r: &Reference, body: Vec<u8>, media_type: &str) -> String {
        let d = digest(&body);
        self.client
            .push_manifest_raw(r, body, http::HeaderValue::from_str(media_type).unwrap())
            .await
            .expect("push a manifest");
        d
    }

    /// Pushes an image: its config, its layers (already compressed, with media types), and
    /// a manifest of `manifest_type`. Returns the manifest digest.
    async fn image(
        &self,
        r: &Reference,
        config: &[u8],
        layers: &[(Vec<u8>, &str)],
        manifest_type: &str,
    ) -> String {
        let config_type = if manifest_type == DOCKER_MANIFEST {
            "application/vnd.docker.container.image.v1+json"
        } else {
            "application/vnd.oci.image.config.v1+json"
        };
        let cd = self.blob(r, config).await;
        let mut ls = Vec::new();
        for (data, mt) in layers {
            let d = self.blob(r, data).await;
            ls.push(json!({"mediaType": mt, "digest": d, "size": data.len()}));
        }
        let m = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": cd, "size": config.len()},
            "layers": ls,
        });
        self.manifest(r, serde_json::to_vec(&m).unwrap(), manifest_type)
            .await
    }
}

fn config_json(user: &str, diff_ids: &[&[u8]]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"User": user, "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|l| digest(l)).collect::<Vec<_>>()},
    }))
    .unwrap()
}

fn tagged(r: &Reference, tag: &str) -> Reference {
    Reference::with_tag(r.registry().into(), r.repository().into(), tag.into())
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

async fn pull(c: &mut CriClient, image: &str) -> Result<String, tonic::Status> {
    c.img
        .pull_image(cri::PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(c: &mut CriClient, image: &str) -> Option<cri::Image> {
    c.img
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

async fn remove(c: &mut CriClient, image: &str) {
    c.img
        .remove_image(cri::RemoveImageRequest { image: spec(image) })
        .await
        .expect("RemoveImage");
}

fn count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_status_list_remove_through_cri() {
    let reg = Registry::start();
    let host = reg.host.clone();
    let p = Pusher::new(&host).await;
    let app = Reference::from_str(&format!("{host}/husk/app:oci")).unwrap();

    // Layer 1: busybox with an `sh` symlink; layer 2 deletes a file of layer 1.
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static)");
    let l1 = tar_of(&[
        ("bin/busybox", &busybox, false),
        ("bin/sh", b"busybox", true),
        ("etc/motd", b"hi\n", false),
    ]);
    let l2 = tar_of(&[
        ("etc/.wh.motd", b"", false),
        ("etc/hostname", b"app\n", false),
    ]);
    let app_config = config_json("1000", &[&l1, &l2]);
    let oci_manifest = p
        .image(
            &app,
            &app_config,
            &[
                (l1.clone(), "application/vnd.oci.image.layer.v1.tar"),
                (gzip(&l2), "application/vnd.oci.image.layer.v1.tar+gzip"),
            ],
            OCI_MANIFEST,
        )
        .await;
    // The same image as a Docker v2 manifest with gzip layers, under another tag.
    let docker_ref = tagged(&app, "docker");
    p.image(
        &docker_ref,
        &app_config,
        &[
            (
                gzip(&l1),
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
            (
                gzip(&l2),
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        ],
        DOCKER_MANIFEST,
    )
    .await;
    // Another image, zstd, with a named user.
    let l3 = tar_of(&[("data/z", b"zstd layer\n", false)]);
    let z_config = config_json("nobody", &[&l3]);
    let zstd_ref = tagged(&app, "zstd");
    let zstd_manifest = p
        .image(
            &zstd_ref,
            &z_config,
            &[(zstd(&l3), "application/vnd.oci.image.layer.v1.tar+zstd")],
            OCI_MANIFEST,
        )
        .await;
    // An index listing arm64 first (the app image) and amd64 (the zstd image).
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": oci_manifest, "size": 1,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": zstd_manifest, "size": 1,
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let index_digest = p.manifest(&tagged(&app, "multi"), index, OCI_INDEX).await;

    let mut huskd = Huskd::start(&format!(
        "default_registry_policy = \"reject\"\n\
         [[huskd.registries]]\nhost = \"{host}\"\npolicy = \"allow-insecure\"\n"
    ));
    let mut c = huskd.connect();
    let v =
        c.rt.version(cri::VersionRequest::default())
            .await
            .expect("Version")
            .into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("husk", "v1")
    );

    // By tag: the id is the config digest; tag and digest recorded.
    let oci_tag = format!("{host}/husk/app:oci");
    let id = pull(&mut c, &oci_tag).await.expect("PullImage oci");
    assert_eq!(id, digest(&app_config));
    let img = status(&mut c, &oci_tag).await.expect("ImageStatus by tag");
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, std::slice::from_ref(&oci_tag));
    let by_digest = format!("{host}/husk/app@{oci_manifest}");
    assert_eq!(img.repo_digests, std::slice::from_ref(&by_digest));
    assert_eq!(img.uid.as_ref().map(|u| u.value), Some(1000));
    assert_eq!(img.size as usize, busybox.len() + 3 + 4);
    assert_eq!(status(&mut c, &id).await.as_ref(), Some(&img), "by id");
    assert_eq!(
        status(&mut c, &by_digest).await.as_ref(),
        Some(&img),
        "by digest"
    );

    // The layers are unpacked once each, with the whiteout as an overlay whiteout.
    let layers = huskd.data.join("images/layers/sha256");
    assert_eq!(count(&layers), 2);
    let l1_root = layers.join(&digest(&l1)[7..]).join("rootfs");
    assert_eq!(std::fs::read(l1_root.join("bin/busybox")).unwrap(), busybox);
    assert_eq!(
        std::fs::read_link(l1_root.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    let wh =
        std::fs::symlink_metadata(layers.join(&digest(&l2)[7..]).join("rootfs/etc/motd")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));

    // Pulling again, or the same image as Docker v2 + gzip, downloads no blob.
    let gets = reg.blob_gets();
    assert_eq!(pull(&mut c, &oci_tag).await.unwrap(), id);
    assert_eq!(
        pull(&mut c, &format!("{host}/husk/app:docker"))
            .await
            .unwrap(),
        id
    );
    assert_eq!(reg.blob_gets(), gets, "a second pull downloaded blobs");
    assert_eq!(count(&layers), 2);
    let img = status(&mut c, &format!("{host}/husk/app:docker"))
        .await
        .unwrap();
    assert_eq!(
        img.repo_tags,
        [oci_tag.clone(), format!("{host}/husk/app:docker")]
    );
    assert_eq!(img.repo_digests.len(), 2, "{:?}", img.repo_digests);

    // The index resolves to linux/amd64 (listed second).
    let multi = format!("{host}/husk/app:multi");
    let zid = pull(&mut c, &multi).await.expect("PullImage index");
    assert_eq!(zid, digest(&z_config));
    let z = status(&mut c, &multi).await.unwrap();
    assert_eq!(z.username, "nobody");
    assert!(z.uid.is_none());
    assert!(z
        .repo_digests
        .contains(&format!("{host}/husk/app@{index_digest}")));
    assert_eq!(
        std::fs::read(layers.join(&digest(&l3)[7..]).join("rootfs/data/z")).unwrap(),
        b"zstd layer\n"
    );

    let list = c
        .img
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    let mut ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    let mut want = vec![id.clone(), zid.clone()];
    want.sort();
    assert_eq!(ids, want);

    let fs = c
        .img
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let used = fs.image_filesystems[0].used_bytes.as_ref().unwrap().value;
    assert_eq!(used as usize, busybox.len() + 3 + 4 + 11);
    assert!(fs.image_filesystems[0].timestamp > 0);

    // Images survive a restart; a crash's leftovers in tmp/ are swept.
    let junk = huskd.data.join("images/tmp/stage-crashed/rootfs");
    std::fs::create_dir_all(&junk).unwrap();
    huskd.crash_restart();
    let mut c = huskd.connect();
    assert!(
        !junk.exists(),
        "a crashed pull's staging dir survived the restart"
    );
    assert_eq!(
        status(&mut c, &multi).await.map(|i| i.id),
        Some(zid.clone())
    );

    // Remove by tag removes the image (all its tags) and its now unused layers; removing
    // again succeeds.
    remove(&mut c, &oci_tag).await;
    assert!(status(&mut c, &format!("{host}/husk/app:docker"))
        .await
        .is_none());
    assert_eq!(count(&layers), 1);
    remove(&mut c, &oci_tag).await;
    remove(&mut c, &zid).await;
    assert_eq!(count(&layers), 0);
    assert_eq!(count(&huskd.data.join("images/blobs/sha256")), 0);
    assert_eq!(count(&huskd.data.join("images/images")), 0);
    huskd.restart();
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_errors_have_their_codes_and_leave_nothing() {
    let reg = Registry::start();
    let host = reg.host.clone();
    let p = Pusher::new(&host).await;
    let r = Reference::from_str(&format!("{host}/husk/bad:1")).unwrap();
    let layer = tar_of(&[("f", b"original content", false)]);
    let config = config_json("", &[&layer]);
    p.image(
        &r,
        &config,
        &[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")],
        OCI_MANIFEST,
    )
    .await;
    // Tamper with the layer in the registry's storage (same length, other bytes).
    let blob = reg.blob_file(&digest(&layer));
    let mut bad = std::fs::read(&blob).unwrap();
    let i = bad.windows(8).position(|w| w == b"original").unwrap();
    bad[i..i + 8].copy_from_slice(b"tampered");
    std::fs::write(&blob, bad).unwrap();

    let huskd = Huskd::start(&format!(
        "default_registry_policy = \"reject\"\n\
         [[huskd.registries]]\nhost = \"{host}\"\npolicy = \"allow-insecure\"\n"
    ));
    let mut c = huskd.connect();
    // (Its CNI conf dir is empty: the network is not ready, and Status says why.)
    let st =
        c.rt.status(cri::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
    let net = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady");
    let net = net.expect("a NetworkReady condition");
    assert!(
        !net.status && net.reason == "NetworkPluginNotReady",
        "{net:?}"
    );
    assert!(net.message.contains("net.d"), "{net:?}");
    let e = pull(&mut c, &format!("{host}/husk/bad:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains(&digest(&layer)), "{e:?}");
    assert!(status(&mut c, &format!("{host}/husk/bad:1"))
        .await
        .is_none());
    let images = huskd.data.join("images");
    for d in ["layers/sha256", "images", "tmp"] {
        assert_eq!(
            count(&images.join(d)),
            0,
            "{d} not empty after a failed pull"
        );
    }

    let e = pull(&mut c, &format!("{host}/husk/missing:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The policy rejects before any connection is made.
    let e = pull(&mut c, "docker.io/library/busybox:latest")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("docker.io"), "{e:?}");
    let e = pull(&mut c, "Not A Reference").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_of_one_image_download_each_layer_once() {
    let reg = Registry::start();
    let host = reg.host.clone();
    let p = Pusher::new(&host).await;
    let r = Reference::from_str(&format!("{host}/husk/twice:1")).unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static)");
    let layers: Vec<Vec<u8>> = (0..3)
        .map(|i| tar_of(&[(&format!("l{i}/busybox"), &busybox, false)]))
        .collect();
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    let config = config_json("", &refs);
    let pushed: Vec<(Vec<u8>, &str)> = layers
        .iter()
        .map(|l| (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip"))
        .collect();
    p.image(&r, &config, &pushed, OCI_MANIFEST).await;
    let huskd = Huskd::start(&format!(
        "[[huskd.registries]]\nhost = \"{host}\"\npolicy = \"allow-insecure\"\n"
    ));
    let name = format!("{host}/husk/twice:1");
    let (mut a, mut b) = (huskd.connect(), huskd.connect());
    let before = reg.blob_gets();
    let (ra, rb) = tokio::join!(pull(&mut a, &name), pull(&mut b, &name));
    assert_eq!(ra.unwrap(), rb.unwrap());
    // One config and three layers, each fetched once (the second pull may find the config
    // stored or fetch it too: it is not a layer, and it is small).
    let layer_gets = reg
        .log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter(|l| {
            pushed
                .iter()
                .any(|(data, _)| l.contains(&digest(data)[7..]))
        })
        .count();
    assert_eq!(
        layer_gets,
        3,
        "layers downloaded more than once ({} blob GETs in all)",
        reg.blob_gets() - before
    );
    assert_eq!(count(&huskd.data.join("images/layers/sha256")), 3);
}

/// kubelet's PullImage carries a deadline (`grpc-timeout`); a registry that never answers
/// must not hold the call past it, and nothing of the pull stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_past_its_deadline_is_deadline_exceeded_and_keeps_nothing() {
    // A "registry" that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let huskd = Huskd::start(&format!(
        "[[huskd.registries]]\nhost = \"{host}\"\npolicy = \"allow-insecure\"\n"
    ));
    let mut c = huskd.connect();
    let mut req = tonic::Request::new(cri::PullImageRequest {
        image: spec(&format!("{host}/husk/silent:1")),
        ..Default::default()
    });
    // The header alone, as a Go client (kubelet) sends it: tonic's own client would also
    // enforce the deadline itself and answer for the server.
    req.metadata_mut()
        .insert("grpc-timeout", "2000m".parse().unwrap());
    let t = std::time::Instant::now();
    let e = c.img.pull_image(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("silent"), "{e:?}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    let images = huskd.data.join("images");
    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(
            count(&images.join(d)),
            0,
            "{d} not empty after the deadline"
        );
    }
    // huskd still serves.
    assert!(status(&mut c, &format!("{host}/husk/silent:1"))
        .await
        .is_none());
}

/// A registry's mirrors are tried in order before it, and the image keeps the registry's
/// name: docker.io (unreachable here) is never asked once a mirror serves the image.
#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_serves_a_registrys_images_under_their_own_names() {
    let reg = Registry::start();
    let host = reg.host.clone();
    let p = Pusher::new(&host).await;
    let at_mirror = Reference::from_str(&format!("{host}/husk/mirrored:1")).unwrap();
    let layer = tar_of(&[("etc/from-mirror", b"yes\n", false)]);
    let config = config_json("", &[&layer]);
    p.image(
        &at_mirror,
        &config,
        &[(layer, "application/vnd.oci.image.layer.v1.tar")],
        OCI_MANIFEST,
    )
    .await;
    // The first mirror refuses connections; the second serves.
    let huskd = Huskd::start(&format!(
        "[[huskd.registries]]\nhost = \"{host}\"\npolicy = \"allow-insecure\"\n\
         [[huskd.mirrors]]\nregistry = \"docker.io\"\nendpoints = [\"127.0.0.1:1\", \"{host}\"]\n"
    ));
    let mut c = huskd.connect();
    let id = pull(&mut c, "docker.io/husk/mirrored:1")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", huskd.log()));
    assert_eq!(id, digest(&config));
    let img = status(&mut c, "husk/mirrored:1")
        .await
        .expect("by its own name");
    assert_eq!(img.repo_tags, ["docker.io/husk/mirrored:1"]);
    assert!(
        img.repo_digests[0].starts_with("docker.io/husk/mirrored@sha256:"),
        "{img:?}"
    );
    assert!(
        status(&mut c, &at_mirror.whole()).await.is_none(),
        "not under the mirror's name"
    );
    // Another registry has no mirror: its pull goes to it (unreachable here) and fails.
    let e = pull(&mut c, "quay.io/husk/mirrored:1").await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert_eq!(count(&huskd.data.join("images/images")), 1);
}
