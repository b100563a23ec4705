//! deploy/kubernetes, checked without a cluster.
//!
//! - The manifests and what `kubectl kustomize` renders from them validate against the
//!   Kubernetes schemas (PyPI's kubernetes-validate, in a venv of its own under the target
//!   dir), offline: both commands run in a network namespace with no network (`unshare -n`).
//!   The kustomization lists every manifest of the directory.
//! - The rendered objects agree with each other and with pgcorral.ini: selectors, ports, probe
//!   targets, mount paths, the generated entrypoint ConfigMap, the drain budget.
//! - peers.sh, with a hosts file bound over /etc/hosts in a mount namespace of its own as the
//!   headless Service's DNS, lists every address with its peer id, refuses a pod whose id
//!   another address has, and leaves out an id two other pods share.
//! - pgcorral runs the ConfigMap's pgcorral.ini (pod paths and ports swapped for the test's)
//!   with the Secret's userlist and the generated [peers]: SHOW PEERS lists them, SHOW CONFIG
//!   has the pod's peer id, /health answers 200, a client reaches PostgreSQL.
//! - peers.sh as the container's PID 1 (a PID and mount namespace, as in a pod) starts
//!   pgcorral, follows pods coming and going and an edited pgcorral.ini with SIGHUP, and turns
//!   the image's stop signal into the drain: stop accepting, serve the connected client, PAUSE,
//!   exit.
//!
//! Needs root (unshare), python3-venv, kubectl (its built-in kustomize) and, once, PyPI.

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::console::show;
use support::*;

/// The validator, pinned: its schemas and its verdicts change with its version.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the manifests are meant for (the PDB's unhealthyPodEvictionPolicy is
/// on by default from 1.27) and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

/// The headless Service's name in the fake DNS of the peers.sh tests.
const SERVICE: &str = "pgcorral-peers";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn peers_sh() -> PathBuf {
    deploy_dir().join("peers.sh")
}

/// What peers.sh must compute, written independently: the low 14 bits of the address, 16383
/// for 0.
fn peer_id(address: &str) -> u16 {
    let octets = address.parse::<Ipv4Addr>().expect("an IPv4 address").octets();
    match ((u16::from(octets[2]) << 8) | u16::from(octets[3])) & 0x3fff {
        0 => 16383,
        id => id,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn check(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `unshare -n -- PROGRAM ARGS`: no network at all, so the command cannot fetch anything.
fn offline(program: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "--"]).arg(program);
    cmd
}

/// The venv with kubernetes-validate (and its PyYAML), built once per target dir: a file lock
/// keeps parallel tests apart, and the marker, written last, names what was installed.
fn validator_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let target = support::target_dir();
        std::fs::create_dir_all(&target).expect("create target dir");
        let venv = target.join("k8s-validate-venv");
        let marker = venv.join(".pgcorral-ready");
        let lock = File::create(target.join("k8s-validate-venv.lock")).expect("create the venv lock");
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            panic!("flock k8s-validate-venv.lock: {}", std::io::Error::last_os_error());
        }
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(VALIDATOR) {
            let _ = std::fs::remove_dir_all(&venv);
            let base = std::env::var("PYTHON3").unwrap_or_else(|_| "python3".into());
            check(
                &run(Command::new(base).arg("-m").arg("venv").arg(&venv), "python3 -m venv"),
                "python3 -m venv",
            );
            check(
                &run(
                    Command::new(venv.join("bin/python")).args([
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--disable-pip-version-check",
                        VALIDATOR,
                    ]),
                    "pip install",
                ),
                "pip install kubernetes-validate",
            );
            std::fs::write(&marker, VALIDATOR).expect("write the venv marker");
        }
        venv
    })
    .clone()
}

/// The manifest files of deploy/kubernetes: every .yaml but the kustomization.
fn manifest_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| (name.ends_with(".yaml") || name.ends_with(".yml")) && name != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

/// Flattens YAML documents into `Kind/name.path.to.field=value` lines (lists as `.0`, `.1`
/// and `.len`); a multi-line value is written to a file of OUT and given as `@path`.
const FLATTEN: &str = r#"
import os, sys, yaml
out = sys.argv[1]
count = 0
def emit(prefix, value):
    global count
    if isinstance(value, dict):
        if not value:
            print(f"{prefix}={{}}")
        for k, v in value.items():
            emit(f"{prefix}.{k}", v)
    elif isinstance(value, list):
        print(f"{prefix}.len={len(value)}")
        for i, v in enumerate(value):
            emit(f"{prefix}.{i}", v)
    else:
        if value is True:
            s = "true"
        elif value is False:
            s = "false"
        elif value is None:
            s = "null"
        else:
            s = str(value)
        if "\n" in s:
            count += 1
            path = os.path.join(out, f"value-{count}")
            with open(path, "w") as f:
                f.write(s)
            s = "@" + path
        print(f"{prefix}={s}")
docs = []
for name in sys.argv[2:]:
    with open(name) as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
for d in docs:
    name = (d.get("metadata") or {}).get("name")
    key = d["kind"] + (f"/{name}" if name else "")
    print(f"doc.{key}=1")
    emit(key, d)
"#;

/// Flattened YAML: exact paths to scalar values.
struct Flat {
    values: BTreeMap<String, String>,
}

impl Flat {
    fn load(files: &[PathBuf], out: &Path) -> Flat {
        let python = validator_venv().join("bin/python");
        let output = run(Command::new(python).arg("-c").arg(FLATTEN).arg(out).args(files), "flatten YAML");
        let values = check(&output, "flatten YAML")
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Flat { values }
    }

    fn opt(&self, path: &str) -> Option<&str> {
        self.values.get(path).map(String::as_str)
    }

    fn get(&self, path: &str) -> &str {
        self.opt(path).unwrap_or_else(|| panic!("{path} is missing from the manifests"))
    }

    fn int(&self, path: &str) -> i64 {
        self.get(path).parse().unwrap_or_else(|_| panic!("{path} = {:?} is not a number", self.get(path)))
    }

    /// A multi-line value's text.
    fn file(&self, path: &str) -> String {
        let value = self.get(path);
        let file = value.strip_prefix('@').unwrap_or_else(|| panic!("{path} is one line: {value:?}"));
        std::fs::read_to_string(file).expect("read a flattened value")
    }

    /// `LIST.i` for the element of LIST whose FIELD is VALUE.
    fn item(&self, list: &str, field: &str, value: &str) -> String {
        let len = self.opt(&format!("{list}.len")).map_or(0, |n| n.parse().unwrap());
        (0..len)
            .map(|i| format!("{list}.{i}"))
            .find(|item| self.opt(&format!("{item}.{field}")) == Some(value))
            .unwrap_or_else(|| panic!("no element of {list} has {field} = {value}"))
    }

    /// The `key=value` pairs of a map (labels, selectors).
    fn map(&self, prefix: &str) -> BTreeMap<String, String> {
        let start = format!("{prefix}.");
        self.values
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&start).map(|key| (key.to_string(), v.clone())))
            .collect()
    }

    /// The documents' `Kind/name`s.
    fn docs(&self) -> Vec<String> {
        self.values.keys().filter_map(|k| k.strip_prefix("doc.")).map(str::to_string).collect()
    }

    /// The one document of KIND whose name starts with PREFIX.
    fn doc(&self, kind: &str, prefix: &str) -> String {
        let found: Vec<String> =
            self.docs().into_iter().filter(|d| d.starts_with(&format!("{kind}/{prefix}"))).collect();
        assert_eq!(found.len(), 1, "one {kind} named {prefix}*, found {found:?}");
        found[0].clone()
    }
}

/// What `kubectl kustomize` renders from deploy/kubernetes, rendered and flattened once.
struct Rendered {
    yaml: PathBuf,
    flat: Flat,
}

fn rendered() -> &'static Rendered {
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    RENDERED.get_or_init(|| {
        require_program("kubectl", "kubectl (its built-in kustomize renders the kustomization)");
        // Kept for the process's life; a later run's scratch_dir sweeps it.
        let dir = scratch_dir("k8srender");
        let out = run(offline(Path::new("kubectl")).arg("kustomize").arg(deploy_dir()), "kubectl kustomize");
        let yaml = dir.join("rendered.yaml");
        std::fs::write(&yaml, check(&out, "kubectl kustomize deploy/kubernetes (offline)")).unwrap();
        let flat = Flat::load(std::slice::from_ref(&yaml), &dir);
        Rendered { yaml, flat }
    })
}

/// The Deployment, and its pod template's spec.
const DEPLOYMENT: &str = "Deployment/pgcorral";
fn pod() -> String {
    format!("{DEPLOYMENT}.spec.template.spec")
}

/// The one container's path.
fn container(flat: &Flat) -> String {
    assert_eq!(flat.int(&format!("{}.containers.len", pod())), 1, "one container");
    format!("{}.containers.0", pod())
}

/// The container's environment variable NAME, as written (value, or `fieldRef:PATH`).
fn env(flat: &Flat, name: &str) -> String {
    let item = flat.item(&format!("{}.env", container(flat)), "name", name);
    match flat.opt(&format!("{item}.value")) {
        Some(value) => value.to_string(),
        None => format!("fieldRef:{}", flat.get(&format!("{item}.valueFrom.fieldRef.fieldPath"))),
    }
}

/// The ConfigMap's pgcorral.ini.
fn ini(flat: &Flat) -> String {
    flat.file(&format!("{}.data.pgcorral.ini", flat.doc("ConfigMap", "pgcorral-config")))
}

/// A `key = value` of the ini (the last one, as pgcorral reads it); comments skipped.
fn ini_value(ini: &str, key: &str) -> Option<String> {
    ini.lines()
        .filter(|l| !l.trim_start().starts_with([';', '#']))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim().to_string())
        .next_back()
}

fn include_path(ini: &str) -> String {
    let includes: Vec<&str> = ini.lines().filter_map(|l| l.trim().strip_prefix("%include ")).collect();
    assert_eq!(includes.len(), 1, "pgcorral.ini includes one file, the generated peers: {includes:?}");
    includes[0].trim().to_string()
}

/// The Secret's userlist.txt.
fn userlist(flat: &Flat) -> String {
    let secret = flat.doc("Secret", "pgcorral-userlist");
    match flat.opt(&format!("{secret}.stringData.userlist.txt")) {
        Some(_) => flat.file(&format!("{secret}.stringData.userlist.txt")),
        None => panic!("the Secret gives userlist.txt as stringData (this test reads it)"),
    }
}

/// The plain password of USER in a userlist ("user" "password").
fn plain_password(userlist: &str, user: &str) -> String {
    let line = userlist
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("\"{user}\"")))
        .unwrap_or_else(|| panic!("{user} is not in the Secret's userlist.txt"));
    let secret = line.split('"').nth(3).expect("\"user\" \"secret\"").to_string();
    assert!(
        !secret.starts_with("md5") && !secret.starts_with("SCRAM-SHA-256$"),
        "the example Secret keeps {user}'s password plain, so that this test can log in"
    );
    secret
}

/// The mount path of the volume whose source is KIND (configMap, secret, emptyDir) NAME.
fn mount_of(flat: &Flat, source: &str, name_field: Option<(&str, &str)>) -> String {
    let volumes = format!("{}.volumes", pod());
    let len = flat.int(&format!("{volumes}.len"));
    let volume = (0..len)
        .map(|i| format!("{volumes}.{i}"))
        .find(|v| match name_field {
            Some((field, name)) => flat.opt(&format!("{v}.{source}.{field}")) == Some(name),
            None => flat.values.keys().any(|k| k.starts_with(&format!("{v}.{source}"))),
        })
        .unwrap_or_else(|| panic!("no {source} volume {name_field:?}"));
    let volume_name = flat.get(&format!("{volume}.name")).to_string();
    let mount = flat.item(&format!("{}.volumeMounts", container(flat)), "name", &volume_name);
    flat.get(&format!("{mount}.mountPath")).to_string()
}

#[test]
fn the_manifests_validate_offline_against_the_kubernetes_schemas() {
    // The kustomization lists every manifest of the directory, and nothing else.
    let files = manifest_files();
    let kustomization = deploy_dir().join("kustomization.yaml");
    let scratch = scratch_dir("k8s");
    let k = Flat::load(&[kustomization], &scratch);
    let listed: Vec<String> = (0..k.int("Kustomization.resources.len"))
        .map(|i| k.get(&format!("Kustomization.resources.{i}")).to_string())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, files, "kustomization.yaml resources must list every manifest in deploy/kubernetes");
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"] {
        assert!(
            files.iter().any(|f| std::fs::read_to_string(deploy_dir().join(f))
                .unwrap()
                .contains(&format!("kind: {kind}\n"))),
            "no {kind} among {files:?}"
        );
    }

    // Each file, and what kustomize renders (the generated ConfigMap and the references to it
    // included), against the oldest and the newest schemas, strictly: an unknown field is an
    // error, not a warning.
    let validate = validator_venv().join("bin/kubernetes-validate");
    let rendered = rendered();
    for version in KUBERNETES_VERSIONS {
        let mut cmd = offline(&validate);
        cmd.args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(files.iter().map(|f| deploy_dir().join(f)))
            .arg(&rendered.yaml);
        let out = run(&mut cmd, "kubernetes-validate");
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "kubernetes-validate against {version}:\n{said}");
        assert!(
            !said.contains("ERROR") && !said.contains("WARN"),
            "kubernetes-validate against {version}:\n{said}"
        );
    }
    // Every object of the files was rendered, plus the entrypoint ConfigMap.
    assert_eq!(rendered.flat.docs().len(), files.len() + 1, "{:?}", rendered.flat.docs());

    // The validator can fail: a misspelt field is caught.
    let typo = scratch.join("typo.yaml");
    let deployment = std::fs::read_to_string(deploy_dir().join("deployment.yaml")).unwrap();
    std::fs::write(&typo, deployment.replacen("readinessProbe:", "readinesProbe:", 1)).unwrap();
    let mut cmd = offline(&validate);
    cmd.args(["--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSIONS[0]]).arg(&typo);
    let out = run(&mut cmd, "kubernetes-validate");
    assert!(!out.status.success(), "a misspelt readinessProbe passed:\n{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("readinesProbe"), "{}", text(&out.stdout));
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn the_rendered_objects_agree_with_each_other_and_with_pgcorral_ini() {
    let r = rendered();
    let f = &r.flat;
    let pod = pod();
    let c = container(f);
    let ini = ini(f);
    let labels = f.map(&format!("{DEPLOYMENT}.spec.template.metadata.labels"));
    let replicas = f.int(&format!("{DEPLOYMENT}.spec.replicas"));
    assert!(replicas >= 2, "several replicas, each its own peer: {replicas}");
    let selects = |selector: BTreeMap<String, String>, what: &str| {
        assert!(!selector.is_empty(), "{what} has a selector");
        for (key, value) in &selector {
            assert_eq!(labels.get(key), Some(value), "{what} selects {key}={value}, the pods say {labels:?}");
        }
    };
    selects(f.map(&format!("{DEPLOYMENT}.spec.selector.matchLabels")), "the Deployment");

    // The proxy port: pgcorral.ini's listen_port is the container's "postgres" port, which
    // both Services target and peers.sh gives each peer.
    let listen_port: i64 =
        ini_value(&ini, "listen_port").expect("listen_port in pgcorral.ini").parse().unwrap();
    let postgres_port = f.item(&format!("{c}.ports"), "name", "postgres");
    assert_eq!(f.int(&format!("{postgres_port}.containerPort")), listen_port);
    assert_eq!(env(f, "PEERS_PORT"), listen_port.to_string());
    let client_service = "Service/pgcorral";
    let headless = format!("Service/{}", env(f, "PEERS_SERVICE"));
    for service in [client_service, headless.as_str()] {
        selects(f.map(&format!("{service}.spec.selector")), service);
        let port = f.item(&format!("{service}.spec.ports"), "name", "postgres");
        assert_eq!(f.get(&format!("{port}.targetPort")), "postgres", "{service}");
    }
    assert_ne!(f.opt(&format!("{client_service}.spec.clusterIP")), Some("None"), "clients get a virtual IP");
    assert_eq!(
        f.get(&format!("{headless}.spec.clusterIP")),
        "None",
        "PEERS_SERVICE names the headless Service"
    );
    assert_eq!(
        f.get(&format!("{headless}.spec.publishNotReadyAddresses")),
        "true",
        "starting pods are listed"
    );

    // The PodDisruptionBudget covers the pods and leaves some running.
    let pdb = f.doc("PodDisruptionBudget", "pgcorral");
    selects(f.map(&format!("{pdb}.spec.selector.matchLabels")), "the PodDisruptionBudget");
    match (f.opt(&format!("{pdb}.spec.maxUnavailable")), f.opt(&format!("{pdb}.spec.minAvailable"))) {
        (Some(max), None) => assert!(max.parse::<i64>().unwrap() < replicas, "maxUnavailable {max}"),
        (None, Some(min)) => assert!(min.parse::<i64>().unwrap() < replicas, "minAvailable {min}"),
        other => panic!("the PDB sets one of maxUnavailable and minAvailable: {other:?}"),
    }

    // Kubernetes' service links would hand pgcorral PGCORRAL_SERVICE_HOST and the like, which
    // it reads as (unknown) settings.
    assert_eq!(f.get(&format!("{pod}.enableServiceLinks")), "false");

    // The entrypoint: peers.sh from the generated ConfigMap, the same bytes as the file, and
    // pgcorral run on the ConfigMap's pgcorral.ini.
    let entrypoint = f.doc("ConfigMap", "pgcorral-entrypoint");
    let generated_name = entrypoint.split_once('/').unwrap().1;
    assert_eq!(
        f.file(&format!("{entrypoint}.data.peers.sh")),
        std::fs::read_to_string(peers_sh()).unwrap(),
        "the entrypoint ConfigMap holds deploy/kubernetes/peers.sh"
    );
    let entry_dir = mount_of(f, "configMap", Some(("name", generated_name)));
    assert_eq!(f.get(&format!("{c}.command.0")), "/bin/sh");
    assert_eq!(f.get(&format!("{c}.command.1")), format!("{entry_dir}/peers.sh"));
    let config_dir = mount_of(f, "configMap", Some(("name", "pgcorral-config")));
    assert_eq!(f.get(&format!("{c}.args.0")), "pgcorral");
    assert_eq!(f.get(&format!("{c}.args.1")), format!("{config_dir}/pgcorral.ini"));
    let auth_dir = mount_of(f, "secret", Some(("secretName", "pgcorral-userlist")));
    assert_eq!(ini_value(&ini, "auth_file"), Some(format!("{auth_dir}/userlist.txt")));
    assert!(userlist(f).contains("\"admin\""), "the Secret has the console's user");
    let reload = env(f, "RELOAD_ON_CHANGE");
    for file in [format!("{config_dir}/pgcorral.ini"), format!("{auth_dir}/userlist.txt")] {
        assert!(reload.split_whitespace().any(|w| w == file), "RELOAD_ON_CHANGE watches {file}: {reload:?}");
    }

    // The generated peers file: written where pgcorral.ini includes it, on the writable
    // emptyDir (the root filesystem is read-only), as is the Unix socket.
    let run_dir = mount_of(f, "emptyDir", None);
    let peers_file = env(f, "PEERS_FILE");
    assert_eq!(include_path(&ini), peers_file);
    assert_eq!(Path::new(&peers_file).parent(), Some(Path::new(&run_dir)));
    assert_eq!(ini_value(&ini, "unix_socket_dir").as_deref(), Some(run_dir.as_str()));
    assert_eq!(f.get(&format!("{c}.securityContext.readOnlyRootFilesystem")), "true");
    assert_eq!(env(f, "POD_IP"), "fieldRef:status.podIP");
    assert_eq!(ini_value(&ini, "peer_id"), None, "peer_id comes from peers.sh (PGCORRAL_PEER_ID), per pod");

    // The image's user (the repository's Dockerfile) runs the pod.
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let uid = dockerfile
        .split("--uid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the Dockerfile's uid");
    assert_eq!(f.get(&format!("{pod}.securityContext.runAsUser")), uid);

    // Probes: readiness on /health at metrics_addr's port; liveness a TCP connection to the
    // proxy port, patient; the startup probe outlasts peers.sh's wait for DNS.
    let metrics_port: i64 = ini_value(&ini, "metrics_addr")
        .and_then(|a| a.rsplit_once(':').map(|(_, p)| p.to_string()))
        .expect("metrics_addr host:port in pgcorral.ini")
        .parse()
        .unwrap();
    let readiness = format!("{c}.readinessProbe");
    assert_eq!(f.get(&format!("{readiness}.httpGet.path")), "/health");
    let metrics = f.get(&format!("{readiness}.httpGet.port"));
    let metrics_container_port = f.item(&format!("{c}.ports"), "name", metrics);
    assert_eq!(f.int(&format!("{metrics_container_port}.containerPort")), metrics_port);
    let liveness = format!("{c}.livenessProbe");
    assert_eq!(f.get(&format!("{liveness}.tcpSocket.port")), "postgres");
    let patience =
        f.int(&format!("{liveness}.failureThreshold")) * f.int(&format!("{liveness}.periodSeconds"));
    assert!(patience >= 30, "liveness gives up after {patience} s only");
    let startup = format!("{c}.startupProbe");
    let start_budget =
        f.int(&format!("{startup}.failureThreshold")) * f.int(&format!("{startup}.periodSeconds"));
    let peers_wait: i64 = env(f, "PEERS_WAIT").parse().unwrap();
    assert!(
        start_budget > peers_wait,
        "the startup probe ({start_budget} s) outlasts PEERS_WAIT ({peers_wait} s)"
    );

    // The drain fits in the grace period: preStop sleep, then peers.sh's drain and pause.
    let pre_stop = format!("{c}.lifecycle.preStop.exec.command");
    assert_eq!(f.get(&format!("{pre_stop}.0")), "sleep");
    let sleep: i64 = f.int(&format!("{pre_stop}.1"));
    assert!(sleep >= 1, "preStop sleeps while the endpoint removal spreads");
    let drain: i64 = env(f, "DRAIN_SECONDS").parse().unwrap();
    let pause: i64 = env(f, "PAUSE_SECONDS").parse().unwrap();
    let grace = f.int(&format!("{pod}.terminationGracePeriodSeconds"));
    assert!(
        sleep + drain + pause < grace,
        "preStop {sleep} + drain {drain} + pause {pause} >= grace {grace}"
    );
    assert!(["TERM", "INT"].contains(&env(f, "DRAIN_SIGNAL").as_str()));

    // Resources: requested, and a memory limit no lower than the request.
    for resource in ["cpu", "memory"] {
        assert!(f.opt(&format!("{c}.resources.requests.{resource}")).is_some(), "requests.{resource}");
    }
    let mib = |q: &str| -> i64 {
        let q = f.get(q);
        match q.strip_suffix("Mi") {
            Some(n) => n.parse().unwrap(),
            None => q.strip_suffix("Gi").expect("memory in Mi or Gi").parse::<i64>().unwrap() * 1024,
        }
    };
    assert!(mib(&format!("{c}.resources.limits.memory")) >= mib(&format!("{c}.resources.requests.memory")));
}

/// Runs peers.sh with HOSTS bound over /etc/hosts in a mount namespace of its own.
fn peers_sh_with_hosts(hosts: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
        .arg(hosts)
        .arg("sh")
        .arg(peers_sh())
        .args(args)
        .env("PEERS_SERVICE", SERVICE)
        .envs(env.iter().copied());
    run(&mut cmd, "peers.sh")
}

/// peers.sh --generate-only for a pod at POD, writing FILE, not waiting for the DNS.
fn generate(hosts: &Path, pod: &str, file: &Path, extra: &[(&str, &str)]) -> Output {
    let file = file.display().to_string();
    let mut env = vec![("POD_IP", pod), ("PEERS_FILE", file.as_str()), ("PEERS_WAIT", "0")];
    env.extend_from_slice(extra);
    peers_sh_with_hosts(hosts, &env, &["--generate-only"])
}

fn hosts_text(addresses: &[&str]) -> String {
    let mut text = String::from("127.0.0.1 localhost\n");
    for address in addresses {
        text.push_str(&format!("{address} {SERVICE}\n"));
    }
    text
}

/// The `id = host=... port=...` lines of a generated file, as (id, host, port).
fn peer_lines(file: &Path) -> Vec<(u16, String, u16)> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(text.lines().any(|l| l.trim() == "[peers]"), "no [peers] header:\n{text}");
    text.lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(id, params)| {
            let param = |key: &str| {
                params
                    .split_whitespace()
                    .find_map(|p| p.strip_prefix(&format!("{key}=")))
                    .unwrap_or_else(|| panic!("no {key}= in {params:?}"))
                    .to_string()
            };
            (id.parse().unwrap(), param("host"), param("port").parse().unwrap())
        })
        .collect()
}

fn expected(addresses: &[&str], port: u16) -> Vec<(u16, String, u16)> {
    let mut lines: Vec<_> = addresses.iter().map(|a| (peer_id(a), a.to_string(), port)).collect();
    lines.sort();
    lines
}

/// Pod addresses for the fake DNS, all on loopback (nothing is ever sent to them).
const OWN: &str = "127.244.1.5";
const OTHERS: [&str; 2] = ["127.244.2.7", "127.244.65.9"];
/// Low 14 bits all zero: peer id 16383.
const ZERO_BITS: &str = "127.244.64.0";
/// Same low 14 bits as OWN.
const CLASHES_WITH_OWN: &str = "127.244.129.5";
/// Same low 14 bits as OTHERS[0].
const CLASHES_WITH_OTHER: &str = "127.244.66.7";

#[test]
fn peers_sh_lists_every_address_with_its_id_and_refuses_a_pod_whose_id_is_taken() {
    let dir = scratch_dir("k8s");
    let hosts = dir.join("hosts");
    let mut all = vec![OWN, ZERO_BITS];
    all.extend(OTHERS);
    std::fs::write(&hosts, hosts_text(&all)).unwrap();
    assert_eq!(peer_id(ZERO_BITS), 16383);
    assert_eq!(peer_id(CLASHES_WITH_OWN), peer_id(OWN));
    assert_eq!(peer_id(CLASHES_WITH_OTHER), peer_id(OTHERS[0]));

    // The fake DNS first: glibc's getent gives every address of the name from the hosts file.
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec getent ahostsv4 \"$1\""])
        .arg(&hosts)
        .arg(SERVICE);
    let answer = check(&run(&mut cmd, "getent"), "getent ahostsv4 with the test's /etc/hosts");
    for address in &all {
        assert!(
            answer.lines().any(|l| l.starts_with(&format!("{address} "))),
            "getent left out {address}:\n{answer}"
        );
    }

    // Every address, with its id, this pod's included, on the port given.
    let file = dir.join("run/peers.ini");
    let out = generate(&hosts, OWN, &file, &[("PEERS_PORT", "7432")]);
    assert_eq!(check(&out, "peers.sh --generate-only").trim(), format!("PGCORRAL_PEER_ID={}", peer_id(OWN)));
    assert_eq!(peer_lines(&file), expected(&all, 7432), "{}", std::fs::read_to_string(&file).unwrap());

    // This pod's address is not in the answer yet (the DNS lags): it is listed all the same.
    let late = dir.join("late.ini");
    let out = generate(&hosts, "127.244.3.3", &late, &[]);
    check(&out, "peers.sh for a pod the DNS does not list yet");
    let mut with_late = all.clone();
    with_late.push("127.244.3.3");
    assert_eq!(peer_lines(&late), expected(&with_late, 6432));
    assert!(text(&out.stderr).contains("not among the addresses"), "{}", text(&out.stderr));

    // Another address has this pod's id: no file, exit 1, and the reason with both addresses.
    let mut clashing = all.clone();
    clashing.push(CLASHES_WITH_OWN);
    std::fs::write(&hosts, hosts_text(&clashing)).unwrap();
    let refused_file = dir.join("refused.ini");
    let out = generate(&hosts, CLASHES_WITH_OWN, &refused_file, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a colliding pod must not start:\n{stderr}");
    for needle in
        ["refusing to start", CLASHES_WITH_OWN, OWN, &format!("peer id {}", peer_id(OWN)), "low 14 bits"]
    {
        assert!(stderr.contains(needle), "the refusal names {needle:?}:\n{stderr}");
    }
    assert!(out.stdout.is_empty(), "no id printed: {}", text(&out.stdout));
    assert!(!refused_file.exists(), "no peers file for a refused pod");

    // Two other pods share an id: left out (a cancel for it is dropped rather than misrouted),
    // unless the running file already had one of them for it, which is kept.
    let mut shared = all.clone();
    shared.push(CLASHES_WITH_OTHER);
    std::fs::write(&hosts, hosts_text(&shared)).unwrap();
    let fresh = dir.join("fresh.ini");
    let out = generate(&hosts, OWN, &fresh, &[]);
    check(&out, "peers.sh with two other pods sharing an id");
    let without: Vec<&str> = all.iter().copied().filter(|a| *a != OTHERS[0]).collect();
    assert_eq!(peer_lines(&fresh), expected(&without, 6432));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("peer id {} is shared by", peer_id(OTHERS[0]))), "{stderr}");
    let out = generate(&hosts, OWN, &file, &[]);
    check(&out, "peers.sh with two other pods sharing an id, one known before");
    assert_eq!(peer_lines(&file), expected(&all, 6432), "the address that had the id keeps it");
    assert!(text(&out.stderr).contains(&format!("keeping {}", OTHERS[0])), "{}", text(&out.stderr));

    // Not IPv4, or missing: refused with the reason.
    let out = generate(&hosts, "fd00::5", &fresh, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not an IPv4 address"), "{}", text(&out.stderr));
    let out = peers_sh_with_hosts(&hosts, &[("POD_IP", "")], &["--generate-only"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("POD_IP is not set"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET path` on 127.0.0.1:port: the status and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// The ConfigMap's pgcorral.ini with what is a pod's swapped for this machine's: the
/// database is the test's PostgreSQL, the generated peers file and the Unix socket directory
/// are the test's, and `drop` keys are left out (those the Pooler harness sets itself).
fn local_ini(
    ini: &str,
    pg: &Postgres,
    peers_file: &Path,
    run_dir: &Path,
    drop: &[&str],
    metrics_port: u16,
) -> String {
    let include = include_path(ini);
    let socket_dir = ini_value(ini, "unix_socket_dir").expect("unix_socket_dir");
    let mut out = String::new();
    let mut in_databases = false;
    for line in ini.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_databases = trimmed.eq_ignore_ascii_case("[databases]");
        }
        let key = trimmed.split_once('=').map(|(k, _)| k.trim().to_ascii_lowercase());
        let line = match key.as_deref() {
            _ if trimmed.starts_with(';') => line.to_string(),
            Some(k) if drop.contains(&k) => continue,
            Some("metrics_addr") => format!("metrics_addr = 127.0.0.1:{metrics_port}"),
            Some("unix_socket_dir") => line.replace(&socket_dir, &run_dir.display().to_string()),
            Some(db) if in_databases => format!("{db} = host=127.0.0.1 port={} dbname={APP_DB}", pg.port),
            _ if trimmed.starts_with("%include") => format!("%include {}", peers_file.display()),
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert!(out.contains(&format!("%include {}", peers_file.display())), "{include} was swapped:\n{out}");
    out
}

async fn console(port: u16, user: &str, password: &str) -> tokio_postgres::Client {
    connect_plain(&format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=pgbouncer sslmode=disable"
    ))
    .await
    .unwrap_or_else(|e| panic!("the admin console on port {port}: {e}"))
}

async fn shown_peers(console: &tokio_postgres::Client) -> Vec<(u16, String, u16)> {
    let table = show(console, "SHOW PEERS").await;
    let mut peers: Vec<_> = table
        .rows
        .iter()
        .map(|r| (r["peer_id"].parse().unwrap(), r["host"].clone(), r["port"].parse().unwrap()))
        .collect();
    peers.sort();
    peers
}

async fn config_value(console: &tokio_postgres::Client, key: &str) -> String {
    show(console, "SHOW CONFIG").await.row("key", key)["value"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn pgcorral_runs_the_configmaps_ini_with_the_generated_peers() {
    let f = &rendered().flat;
    let ini = ini(f);
    let users = userlist(f);
    let admin =
        ini_value(&ini, "admin_users").expect("admin_users").split(',').next().unwrap().trim().to_string();
    let admin_password = plain_password(&users, &admin);
    let app_password = plain_password(&users, APP_USER);
    let pg = Postgres::shared();

    let dir = scratch_dir("k8s");
    let hosts = dir.join("hosts");
    let mut all = vec![OWN, ZERO_BITS];
    all.extend(OTHERS);
    std::fs::write(&hosts, hosts_text(&all)).unwrap();
    let peers_file = dir.join("peers.ini");
    let listen_port = ini_value(&ini, "listen_port").unwrap();
    let peers_file_env = peers_file.display().to_string();
    let out = tokio::task::block_in_place(|| {
        peers_sh_with_hosts(
            &hosts,
            &[("POD_IP", OWN), ("PEERS_FILE", &peers_file_env), ("PEERS_PORT", &listen_port)],
            &["--generate-only"],
        )
    });
    let printed = check(&out, "peers.sh --generate-only");
    let (var, id) = printed.trim().split_once('=').expect("VAR=id");

    let metrics = free_port();
    let ini = local_ini(
        &ini,
        pg,
        &peers_file,
        &dir,
        &["listen_addr", "listen_port", "unix_socket_dir", "auth_file"],
        metrics,
    );
    let pooler = Pooler::start_with_env(&ini, &users, &[(var, id)])
        .unwrap_or_else(|e| panic!("pgcorral refused the ConfigMap's pgcorral.ini:\n{e}\n{ini}"));
    let console = console(pooler.port, &admin, &admin_password).await;
    assert_eq!(shown_peers(&console).await, expected(&all, listen_port.parse().unwrap()), "{}", pooler.log());
    assert_eq!(config_value(&console, "peer_id").await, peer_id(OWN).to_string());

    // The readiness probe's target, and a client through the pool to PostgreSQL.
    let (status, body) = http_get(metrics, "/health");
    assert_eq!(status, 200, "/health: {body}\n{}", pooler.log());
    let db =
        ini.lines().find(|l| l.contains("host=127.0.0.1")).and_then(|l| l.split_once('=')).unwrap().0.trim();
    let client =
        pooler.connect(APP_USER, &app_password, db).await.unwrap_or_else(|e| panic!("{e}\n{}", pooler.log()));
    assert_eq!(first_value(&client, "SELECT 40 + 2").await.unwrap(), "42");
    let (status, body) = http_get(metrics, "/health");
    assert_eq!(status, 200);
    assert!(body.contains(&format!("\"{db}\":\"reachable\"")), "{body}");
    drop(pooler);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Dockerfile's STOPSIGNAL (SIGTERM when it sets none), by name and number.
fn image_stop_signal() -> (String, i32) {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let name = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("STOPSIGNAL "))
        .map_or("SIGTERM".to_string(), |s| s.trim().to_string());
    let number = match name.as_str() {
        "SIGTERM" => libc::SIGTERM,
        "SIGINT" => libc::SIGINT,
        other => panic!("peers.sh handles SIGTERM and SIGINT as stop signals, the Dockerfile says {other}"),
    };
    (name, number)
}

/// `unshare --fork --kill-child`, killed (and the namespace with it) if the test ends early.
struct Pod(std::process::Child);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host pid of the first child of `pid` (the namespace's PID 1 under `unshare --fork`).
fn first_child(pid: u32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_sh_as_pid_1_follows_the_pods_reloads_and_drains_on_the_stop_signal() {
    let f = &rendered().flat;
    let ini_text = ini(f);
    let users = userlist(f);
    let admin = ini_value(&ini_text, "admin_users").unwrap().split(',').next().unwrap().trim().to_string();
    let admin_password = plain_password(&users, &admin);
    let app_password = plain_password(&users, APP_USER);
    let pg = Postgres::shared();

    let dir = scratch_dir("k8s");
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let hosts = dir.join("hosts");
    let mut pods = vec![OWN, OTHERS[0]];
    std::fs::write(&hosts, hosts_text(&pods)).unwrap();
    let (port, metrics) = (free_port(), free_port());
    let peers_file = dir.join("run/peers.ini");
    let ini_path = dir.join("pgcorral.ini");
    let auth = dir.join("userlist.txt");
    let auth_dir = mount_of(f, "secret", Some(("secretName", "pgcorral-userlist")));
    let ini_text = local_ini(&ini_text, pg, &peers_file, &dir.join("run"), &[], metrics)
        .replace(&format!("{auth_dir}/userlist.txt"), &auth.display().to_string());
    std::fs::write(&ini_path, &ini_text).unwrap();
    std::fs::write(&auth, &users).unwrap();

    // As the Deployment runs it, with the drain shortened: PID 1 of a PID namespace (where
    // signals without a handler are ignored, as in a container), the test's hosts file as DNS.
    let log = dir.join("pod.log");
    let out = File::create(&log).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--"])
        .args(["sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
        .arg(&hosts)
        .arg("sh")
        .arg(peers_sh())
        .arg(pgcorral_binary())
        .arg(&ini_path)
        .env("POD_IP", OWN)
        .env("PEERS_SERVICE", SERVICE)
        .env("PEERS_PORT", port.to_string())
        .env("PEERS_FILE", &peers_file)
        .env("PEERS_REFRESH", "1")
        .env("PEERS_WAIT", "5")
        .env("RELOAD_ON_CHANGE", format!("{} {}", ini_path.display(), auth.display()))
        .env("DRAIN_SIGNAL", "TERM")
        .env("DRAIN_SECONDS", "2")
        .env("PAUSE_SECONDS", "1")
        // What a pod could set too: pgcorral's own overrides.
        .env("PGCORRAL_LISTEN_PORT", port.to_string())
        .env("PGCORRAL_LISTEN_ADDR", "127.0.0.1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut pod = Pod(spawn_supervised(cmd).expect("spawn unshare"));
    let pod_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let listening = wait_until(Duration::from_secs(15), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(listening, "pgcorral did not listen:\n{}", pod_log());
    let pid1 = first_child(pod.0.id()).expect("unshare's child, PID 1 of the namespace");

    let console = console(port, &admin, &admin_password).await;
    assert_eq!(shown_peers(&console).await, expected(&pods, port), "{}", pod_log());
    assert_eq!(config_value(&console, "peer_id").await, peer_id(OWN).to_string());

    // A pod comes, another goes: the file follows and pgcorral reloads [peers].
    pods = vec![OWN, OTHERS[1], ZERO_BITS];
    std::fs::write(&hosts, hosts_text(&pods)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut shown = shown_peers(&console).await;
    while shown != expected(&pods, port) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shown = shown_peers(&console).await;
    }
    assert_eq!(shown, expected(&pods, port), "SHOW PEERS did not follow the DNS\n{}", pod_log());

    // An edited pgcorral.ini (the kubelet updating the ConfigMap's file) is reloaded too.
    let pool_size = ini_value(&ini_text, "default_pool_size").unwrap();
    let new_size = (pool_size.parse::<u32>().unwrap() + 1).to_string();
    std::fs::write(
        &ini_path,
        ini_text
            .replace(&format!("default_pool_size = {pool_size}"), &format!("default_pool_size = {new_size}")),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = config_value(&console, "default_pool_size").await;
    while seen != new_size && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = config_value(&console, "default_pool_size").await;
    }
    assert_eq!(seen, new_size, "the edited pgcorral.ini was not reloaded\n{}", pod_log());

    // A client of the pool holds the drain. PID 1 gets the stop signal the repository's image
    // declares (containerd and CRI-O send the image's STOPSIGNAL, SIGTERM without one), and
    // pgcorral gets DRAIN_SIGNAL whichever it was.
    let db = ini_text
        .lines()
        .find(|l| l.contains("host=127.0.0.1"))
        .and_then(|l| l.split_once('='))
        .unwrap()
        .0
        .trim();
    let client = connect_plain(&conninfo(port, APP_USER, &app_password, db)).await.expect("a client");
    assert_eq!(first_value(&client, "SELECT 1").await.unwrap(), "1");
    let (stop_name, stop_signal) = image_stop_signal();
    let stopped = Instant::now();
    unsafe {
        libc::kill(pid1, stop_signal);
    }
    assert!(
        wait_until(Duration::from_secs(5), || http_get(metrics, "/health").0 == 503),
        "/health did not turn 503 on {stop_name}\n{}",
        pod_log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(("127.0.0.1", port)).is_err()),
        "still accepting after {stop_name}\n{}",
        pod_log()
    );
    assert_eq!(first_value(&client, "SELECT 2").await.unwrap(), "2", "the connected client is still served");

    // The client does not leave: PAUSE after DRAIN_SECONDS, exit PAUSE_SECONDS later.
    let mut status = None;
    let exited = wait_until(Duration::from_secs(15), || {
        status = pod.0.try_wait().unwrap();
        status.is_some()
    });
    let took = stopped.elapsed();
    let log_text = pod_log();
    assert!(exited, "the pod did not stop\n{log_text}");
    assert!(took >= Duration::from_secs(2), "stopped after {took:?}, before DRAIN_SECONDS\n{log_text}");
    assert!(status.unwrap().success(), "{:?}\n{log_text}", status);
    let mut at = 0;
    let first = format!("peers.sh: got {stop_name}: sending pgcorral SIGTERM");
    for line in [
        first.as_str(),
        "got SIGTERM, shutting down once clients have left",
        "sending pgcorral SIGUSR1 (PAUSE)",
        "got SIGUSR1, pausing",
        "sending pgcorral SIGQUIT",
        "got SIGQUIT, exiting now",
        "peers.sh: pgcorral exited with status 0",
    ] {
        let found =
            log_text[at..].find(line).unwrap_or_else(|| panic!("no {line:?} (in order) in:\n{log_text}"));
        at += found + line.len();
    }
    assert!(first_value(&client, "SELECT 3").await.is_err(), "the client outlived pgcorral");
    let _ = std::fs::remove_dir_all(&dir);
}
