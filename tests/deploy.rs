//! The shipped deployment artifacts hold against the real configuration loader: the sidecache
//! configuration embedded in `config/k8s/configmap.yaml` loads and validates (the password file
//! is redirected to a temporary file, as the Secret mount would provide it), and the Dockerfile
//! bakes in the reference configuration at the path its entrypoint reads.
//!
//! The schema and cross-checks of the manifests themselves are in `scripts/check-deploy.py`
//! and `kubernetes-validate --strict`, both run by `.ci/run`.

use std::path::{Path, PathBuf};

use sidecache::Config;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The block scalar `key: |` of a YAML document, dedented (enough YAML for one ConfigMap key).
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().unwrap_or_else(|| panic!("no block scalar {key}: |"));
    let key_indent = header.len() - header.trim_start().len();
    let body: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent).collect();
    let indent =
        body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    body.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn k8s_configmap_config_is_valid_for_the_real_loader() {
    let yaml = std::fs::read_to_string(repo_path("config/k8s/configmap.yaml")).expect("read configmap.yaml");
    let toml = block_scalar(&yaml, "sidecache.toml");
    assert!(toml.contains("admin_listen"), "extracted config:\n{toml}");
    let dir = std::env::temp_dir().join(format!("sidecache-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecache.toml");
    std::fs::write(&file, &toml).unwrap();
    let secret = dir.join("redis-password");
    std::fs::write(&secret, "change-me\n").unwrap();
    // The Secret is mounted at /etc/sidecache-secret in the Pod; here the environment points
    // the same key at a local file (SIDECACHE_* overrides the file, as in a container).
    let env = [("SIDECACHE_UPSTREAM__PASSWORD_FILE".to_string(), secret.display().to_string())];
    let loaded = Config::load(Some(&file), &env, &Default::default());
    let _ = std::fs::remove_dir_all(&dir);
    let config = loaded.unwrap_or_else(|e| panic!("configmap.yaml's sidecache.toml is invalid:\n{e}\n---\n{toml}"));
    assert_eq!(config.admin_listen, "0.0.0.0:9180", "probes and Prometheus reach the admin port over the Pod IP");
    assert_eq!(config.listen, "127.0.0.1:6380", "only the app, over localhost, reaches the proxy port");
    assert_eq!(config.upstream.password_file.as_deref(), Some(secret.as_path()));
}

#[test]
fn dockerfile_bakes_the_reference_config_where_the_entrypoint_reads_it() {
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).expect("read Dockerfile");
    assert!(dockerfile.contains("COPY config/sidecache.toml /etc/sidecache/sidecache.toml"));
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/sidecache", "--config", "/etc/sidecache/sidecache.toml"]"#)
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("USER 65532:65532"), "runs as the distroless nonroot user");
    // The baked-in file is the commented reference, which must load as is.
    Config::load(Some(&repo_path("config/sidecache.toml")), &[], &Default::default())
        .expect("config/sidecache.toml loads");
}
