//! Where the control plane finds the Kubernetes API server, and how it trusts and authenticates
//! to it. In order:
//!
//! 1. `--kube-api-url` (with `--kube-ca` and `--kube-token-file`, by default the pod's
//!    service-account files): what the operator wrote wins.
//! 2. With `--kubernetes`: a kubeconfig (`--kubeconfig`, env `KUBECONFIG`), its current context
//!    or `--kube-context`. Relative paths in it are relative to its folder, as for kubectl.
//! 3. With `--kubernetes`: the pod's own service account (`KUBERNETES_SERVICE_HOST`/`_PORT` and
//!    [`SERVICE_ACCOUNT_DIR`]).
//!
//! `--kube-ca` or `--kube-token-file` given alone replace the CA or the token of source 2 or 3.
//!
//! Only bearer tokens authenticate (`token`, `tokenFile`). Client certificates would need a second
//! TLS set-up path for one use, and exec or auth-provider plugins would run programs inside the
//! control plane's container; a kubeconfig user relying on them is refused with its name, so the
//! operator knows which credential to give instead. An inline token stays in memory: it is never
//! logged and never part of an error.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{KubeCa, KubeConfig, KubeToken};

/// Where Kubernetes mounts a pod's service-account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The `serve` flags that choose the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeFlags {
    /// `--kubernetes`: run against the cluster (kubeconfig or in-cluster when no URL is given).
    pub kubernetes: bool,
    pub api_url: Option<String>,
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// `--kubeconfig` or `KUBECONFIG`: one path, or several separated by `:` as for kubectl.
    pub kubeconfig: Option<String>,
    pub context: Option<String>,
}

/// The API server found, and where it was found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: KubeConfig,
    /// For the start-up log: `--kube-api-url`, `kubeconfig PATH (context NAME)` or `in-cluster`.
    pub source: String,
    /// The namespace the source names: the pod's own in-cluster, or the context's.
    pub namespace: Option<String>,
}

/// The API server to use: `None` without `--kube-api-url` and without `--kubernetes`.
pub fn resolve(flags: &KubeFlags) -> Result<Option<Resolved>, String> {
    resolve_with(
        flags,
        &|name| std::env::var(name).ok(),
        Path::new(SERVICE_ACCOUNT_DIR),
    )
}

/// A source's findings; the CA and token may have failed, which matters only if no flag
/// replaces them.
struct Found {
    url: String,
    ca: Result<KubeCa, String>,
    token: Result<KubeToken, String>,
    source: String,
    namespace: Option<String>,
}

fn resolve_with(
    flags: &KubeFlags,
    env: &dyn Fn(&str) -> Option<String>,
    service_account: &Path,
) -> Result<Option<Resolved>, String> {
    let kubeconfig = flags.kubeconfig.as_deref().filter(|k| !k.is_empty());
    if flags.context.is_some() && (flags.api_url.is_some() || kubeconfig.is_none()) {
        return Err(
            "--kube-context selects a context of --kubeconfig (or KUBECONFIG), and there is none to select from"
                .into(),
        );
    }
    let found = if let Some(url) = &flags.api_url {
        Found {
            url: url.clone(),
            ca: Ok(KubeCa::File(service_account.join("ca.crt"))),
            token: Ok(KubeToken::File(service_account.join("token"))),
            source: "--kube-api-url".into(),
            namespace: None,
        }
    } else if !flags.kubernetes {
        return Ok(None);
    } else if let Some(paths) = kubeconfig {
        from_kubeconfig(paths, flags.context.as_deref())?
    } else {
        in_cluster(env, service_account)?
    };
    let ca = match &flags.ca {
        Some(path) => KubeCa::File(path.clone()),
        None => found.ca?,
    };
    let token = match &flags.token_file {
        Some(path) => KubeToken::File(path.clone()),
        None => found.token?,
    };
    Ok(Some(Resolved {
        config: KubeConfig {
            url: found.url,
            ca,
            token: Some(token),
        },
        source: found.source,
        namespace: found.namespace,
    }))
}

fn in_cluster(env: &dyn Fn(&str) -> Option<String>, dir: &Path) -> Result<Found, String> {
    let host = env("KUBERNETES_SERVICE_HOST")
        .filter(|h| !h.is_empty())
        .ok_or(
            "--kubernetes: KUBERNETES_SERVICE_HOST is not set, so this is not a pod; give the API server with --kubeconfig or --kube-api-url",
        )?;
    let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
    port.parse::<u16>()
        .map_err(|_| format!("KUBERNETES_SERVICE_PORT {port:?}: not a port number"))?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let ca_path = dir.join("ca.crt");
    let ca = std::fs::read(&ca_path)
        .map(|pem| KubeCa::Pem {
            pem,
            origin: format!("the in-cluster CA {}", ca_path.display()),
        })
        .map_err(|e| {
            format!(
                "the in-cluster CA {}: {e} (is a service-account token mounted into the pod?)",
                ca_path.display()
            )
        });
    let namespace = std::fs::read_to_string(dir.join("namespace"))
        .ok()
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty());
    Ok(Found {
        url: format!("https://{host}:{port}"),
        ca,
        token: Ok(KubeToken::File(dir.join("token"))),
        source: "in-cluster".into(),
        namespace,
    })
}

/// The parts of a kubeconfig this client reads; other fields are ignored, as kubectl does.
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    #[serde(default)]
    cluster: Cluster,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: Option<String>,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<String>,
    proxy_url: Option<String>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    #[serde(default)]
    context: Context,
}

#[derive(Deserialize, Default)]
struct Context {
    #[serde(default)]
    cluster: String,
    user: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

/// A user's credentials. The ones this client cannot use are only noticed, never read.
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<IgnoredAny>,
    client_certificate_data: Option<IgnoredAny>,
    exec: Option<IgnoredAny>,
    auth_provider: Option<IgnoredAny>,
    username: Option<IgnoredAny>,
}

/// One kubeconfig file, parsed.
struct File {
    path: PathBuf,
    config: Kubeconfig,
}

impl File {
    fn read(path: &Path) -> Result<Self, String> {
        let at = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("kubeconfig {at}: {e}"))?;
        // The parser's message may quote the offending line, which may hold a token: keep its
        // first line and position only.
        let config: Kubeconfig = serde_saphyr::from_str(&text).map_err(|e| {
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            format!("kubeconfig {at}: not a kubeconfig: {first}")
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
        })
    }

    /// A path written in this file, made relative to its folder as kubectl does.
    fn relative(&self, path: &str) -> PathBuf {
        match self.path.parent() {
            Some(dir) => dir.join(path),
            None => PathBuf::from(path),
        }
    }
}

/// Entries with the same name in several files: the first file wins, as for kubectl.
fn find<'a, T>(
    files: &'a [File],
    list: impl Fn(&'a Kubeconfig) -> &'a [T],
    name_of: impl Fn(&T) -> &str,
    name: &str,
) -> Option<(&'a File, &'a T)> {
    files.iter().find_map(|file| {
        list(&file.config)
            .iter()
            .find(|entry| name_of(entry) == name)
            .map(|entry| (file, entry))
    })
}

fn from_kubeconfig(paths: &str, context: Option<&str>) -> Result<Found, String> {
    let paths: Vec<PathBuf> = std::env::split_paths(paths)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    // Like kubectl: of several files, those missing are skipped; one named alone must exist.
    let files = if let [path] = paths.as_slice() {
        vec![File::read(path)?]
    } else {
        let files: Vec<File> = paths
            .iter()
            .filter(|p| p.exists())
            .map(|p| File::read(p))
            .collect::<Result<_, _>>()?;
        if files.is_empty() {
            return Err(format!(
                "KUBECONFIG: none of {} exists",
                std::env::join_paths(&paths)
                    .map(|j| j.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
        }
        files
    };
    let all = files
        .iter()
        .map(|f| f.path.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let context_names = || {
        files
            .iter()
            .flat_map(|f| f.config.contexts.iter().map(|c| format!("{:?}", c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(name) = context.map(str::to_string).or_else(|| {
        files
            .iter()
            .find_map(|f| f.config.current_context.clone().filter(|c| !c.is_empty()))
    }) else {
        return Err(format!(
            "kubeconfig {all}: no current-context; choose one with --kube-context (contexts: {})",
            context_names()
        ));
    };
    let Some((file, ctx)) = find(&files, |k| &k.contexts, |c| &c.name, &name) else {
        return Err(format!(
            "kubeconfig {all}: no context {name:?} (contexts: {})",
            context_names()
        ));
    };
    let ctx = &ctx.context;
    let cluster_name = &ctx.cluster;
    let Some((file, cluster)) = find(&files, |k| &k.clusters, |c| &c.name, cluster_name) else {
        return Err(format!(
            "kubeconfig {}: context {name:?} names cluster {cluster_name:?}, which is not there",
            file.path.display()
        ));
    };
    let cluster = &cluster.cluster;
    let at = format!(
        "kubeconfig {}, cluster {cluster_name:?}",
        file.path.display()
    );
    let url = cluster
        .server
        .clone()
        .ok_or_else(|| format!("{at}: no server"))?;
    if !url.starts_with("https://") {
        return Err(format!(
            "{at}: server {url:?} is not https:// (a bearer token is never sent over plaintext)"
        ));
    }
    let unsupported = [
        (cluster.insecure_skip_tls_verify, "insecure-skip-tls-verify"),
        (cluster.tls_server_name.is_some(), "tls-server-name"),
        (cluster.proxy_url.is_some(), "proxy-url"),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(format!(
            "{at}: {field} is not supported; give the cluster's own name and CA (certificate-authority, or --kube-ca)"
        ));
    }
    // As in client-go, the inline data wins over the file.
    let ca = if let Some(data) = &cluster.certificate_authority_data {
        let data: String = data.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map(|pem| KubeCa::Pem {
                pem,
                origin: format!("{at}, certificate-authority-data"),
            })
            .map_err(|e| format!("{at}, certificate-authority-data: not base64: {e}"))
    } else if let Some(path) = &cluster.certificate_authority {
        let path = file.relative(path);
        let origin = format!("{at}, certificate-authority {}", path.display());
        std::fs::read(&path)
            .map(|pem| KubeCa::Pem {
                pem,
                origin: origin.clone(),
            })
            .map_err(|e| format!("{origin}: {e}"))
    } else {
        Err(format!(
            "{at}: neither certificate-authority nor certificate-authority-data; give the API server's CA with --kube-ca"
        ))
    };
    let token = match ctx.user.as_deref().filter(|u| !u.is_empty()) {
        None => Err(format!(
            "kubeconfig {}: context {name:?} names no user; give a token with --kube-token-file",
            file.path.display()
        )),
        Some(user_name) => match find(&files, |k| &k.users, |u| &u.name, user_name) {
            None => Err(format!(
                "kubeconfig {all}: context {name:?} names user {user_name:?}, which is not there"
            )),
            Some((file, user)) => token_of(file, user_name, &user.user),
        },
    };
    Ok(Found {
        url,
        ca,
        token,
        source: format!("kubeconfig {} (context {name})", file.path.display()),
        namespace: ctx.namespace.clone().filter(|ns| !ns.is_empty()),
    })
}

fn token_of(file: &File, name: &str, user: &User) -> Result<KubeToken, String> {
    let at = format!("kubeconfig {}, user {name:?}", file.path.display());
    // As in client-go, a token file wins over an inline token: it is the one kept fresh.
    if let Some(path) = &user.token_file {
        return Ok(KubeToken::File(file.relative(path)));
    }
    if let Some(token) = &user.token {
        return Ok(KubeToken::Inline {
            token: token.clone(),
            origin: format!("{at}, token"),
        });
    }
    let how = if user.exec.is_some() {
        "an exec plugin"
    } else if user.auth_provider.is_some() {
        "an auth-provider plugin"
    } else if user.client_certificate.is_some() || user.client_certificate_data.is_some() {
        "a client certificate"
    } else if user.username.is_some() {
        "a username and password"
    } else {
        "nothing"
    };
    Err(format!(
        "{at} authenticates with {how}; trellis-control supports only bearer tokens: give the user a token or tokenFile, or pass --kube-token-file"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `base64 -w0` of a PEM header line: the resolver only decodes it, the client parses it.
    const CA_DATA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==";
    const SECRET: &str = "s3cr3t-inline-token";

    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("trellis-kubeconfig-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A kubeconfig with two contexts: `dev` (inline CA data, inline token, namespace shop) and
    /// `prod` (CA file and token file relative to the kubeconfig).
    fn kubeconfig(prod_user: &str) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: dev
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: {CA_DATA}
- name: prod
  cluster:
    server: https://prod.example:443
    certificate-authority: certs/prod-ca.pem
contexts:
- name: dev
  context: {{cluster: dev, user: dev-admin, namespace: shop}}
- name: prod
  context: {{cluster: prod, user: prod-user}}
users:
- name: dev-admin
  user:
    token: {SECRET}
- name: prod-user
  user:
{prod_user}
"#
        )
    }

    fn flags(kubeconfig: &Path, context: Option<&str>) -> KubeFlags {
        KubeFlags {
            kubernetes: true,
            kubeconfig: Some(kubeconfig.display().to_string()),
            context: context.map(str::to_string),
            ..KubeFlags::default()
        }
    }

    fn resolve_here(flags: &KubeFlags) -> Result<Option<Resolved>, String> {
        resolve_with(flags, &|_| None, Path::new("/nonexistent-service-account"))
    }

    #[test]
    fn current_context_with_inline_ca_and_token() {
        let dir = Dir::new("current");
        let path = dir.write("config", &kubeconfig("    tokenFile: prod-token"));
        let resolved = resolve_here(&flags(&path, None)).unwrap().unwrap();
        assert_eq!(resolved.config.url, "https://127.0.0.1:6443");
        assert_eq!(resolved.namespace.as_deref(), Some("shop"));
        assert!(
            resolved.source.contains("context dev"),
            "{}",
            resolved.source
        );
        match &resolved.config.ca {
            KubeCa::Pem { pem, origin } => {
                assert_eq!(pem, b"-----BEGIN CERTIFICATE-----\n");
                assert!(origin.contains("certificate-authority-data"), "{origin}");
            }
            other => panic!("{other:?}"),
        }
        match &resolved.config.token {
            Some(KubeToken::Inline { token, origin }) => {
                assert_eq!(token, SECRET);
                assert!(origin.contains("\"dev-admin\""), "{origin}");
            }
            other => panic!("{other:?}"),
        }
        let debug = format!("{resolved:?}");
        assert!(
            !debug.contains(SECRET),
            "the token leaks through Debug: {debug}"
        );
    }

    #[test]
    fn chosen_context_reads_files_relative_to_the_kubeconfig() {
        let dir = Dir::new("relative");
        std::fs::create_dir_all(dir.0.join("certs")).unwrap();
        dir.write("certs/prod-ca.pem", "PEM");
        let path = dir.write("config", &kubeconfig("    tokenFile: prod-token"));
        let resolved = resolve_here(&flags(&path, Some("prod"))).unwrap().unwrap();
        assert_eq!(resolved.config.url, "https://prod.example:443");
        assert_eq!(resolved.namespace, None);
        assert!(
            matches!(&resolved.config.ca, KubeCa::Pem { pem, .. } if pem == b"PEM"),
            "{:?}",
            resolved.config.ca
        );
        assert!(
            matches!(&resolved.config.token, Some(KubeToken::File(p)) if *p == dir.0.join("prod-token")),
            "{:?}",
            resolved.config.token
        );
    }

    #[test]
    fn refuses_users_without_a_bearer_token_by_name_unless_a_flag_gives_one() {
        let dir = Dir::new("users");
        std::fs::create_dir_all(dir.0.join("certs")).unwrap();
        dir.write("certs/prod-ca.pem", "PEM");
        for (user, how) in [
            (
                "    client-certificate-data: AAAA\n    client-key-data: AAAA",
                "a client certificate",
            ),
            (
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws",
                "an exec plugin",
            ),
            ("    {}", "nothing"),
        ] {
            let path = dir.write("config", &kubeconfig(user));
            let err = resolve_here(&flags(&path, Some("prod"))).unwrap_err();
            assert!(
                err.contains("user \"prod-user\"")
                    && err.contains(how)
                    && err.contains("only bearer tokens"),
                "{err}"
            );
            let mut with_token = flags(&path, Some("prod"));
            with_token.token_file = Some("/run/token".into());
            let resolved = resolve_here(&with_token).unwrap().unwrap();
            assert!(
                matches!(resolved.config.token, Some(KubeToken::File(p)) if p == Path::new("/run/token"))
            );
        }
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = Dir::new("errors");
        let path = dir.write("config", &kubeconfig("    tokenFile: t"));
        let err = resolve_here(&flags(&path, Some("staging"))).unwrap_err();
        assert!(
            err.contains("no context \"staging\"") && err.contains("\"dev\", \"prod\""),
            "{err}"
        );
        let err = resolve_here(&flags(&path, Some("prod"))).unwrap_err();
        assert!(
            err.contains("cluster \"prod\", certificate-authority")
                && err.contains("certs/prod-ca.pem"),
            "{err}"
        );
        let plain = dir.write(
            "plain",
            "current-context: c\nclusters: [{name: c, cluster: {server: 'http://10.0.0.1:8080'}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n",
        );
        let err = resolve_here(&flags(&plain, None)).unwrap_err();
        assert!(err.contains("is not https://"), "{err}");
        let insecure = dir.write(
            "insecure",
            "current-context: c\nclusters: [{name: c, cluster: {server: 'https://x', insecure-skip-tls-verify: true}}]\ncontexts: [{name: c, context: {cluster: c}}]\n",
        );
        let err = resolve_here(&flags(&insecure, None)).unwrap_err();
        assert!(err.contains("insecure-skip-tls-verify"), "{err}");
        let none = dir.write("none", "clusters: []\n");
        let err = resolve_here(&flags(&none, None)).unwrap_err();
        assert!(err.contains("no current-context"), "{err}");
        let err = resolve_here(&flags(&dir.0.join("missing"), None)).unwrap_err();
        assert!(
            err.starts_with("kubeconfig ") && err.contains("missing"),
            "{err}"
        );
        let broken = dir.write(
            "broken",
            &format!("users: [{{name: u, user: {{token: {SECRET}}}}}\n"),
        );
        let err = resolve_here(&flags(&broken, None)).unwrap_err();
        assert!(err.contains("not a kubeconfig"), "{err}");
        assert!(!err.contains(SECRET), "the token leaks into {err}");
    }

    #[test]
    fn several_kubeconfigs_the_first_wins_and_missing_ones_are_skipped() {
        let dir = Dir::new("several");
        let first = dir.write(
            "first",
            "current-context: a\ncontexts: [{name: a, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {tokenFile: first-token}}]\n",
        );
        let second = dir.write(
            "second",
            &format!("current-context: b\nclusters: [{{name: c, cluster: {{server: 'https://second', certificate-authority-data: {CA_DATA}}}}}]\nusers: [{{name: u, user: {{token: other}}}}]\n"),
        );
        let list = std::env::join_paths([dir.0.join("missing"), first, second]).unwrap();
        let mut flags = flags(Path::new(""), None);
        flags.kubeconfig = Some(list.to_string_lossy().into_owned());
        let resolved = resolve_here(&flags).unwrap().unwrap();
        assert_eq!(resolved.config.url, "https://second");
        assert!(
            matches!(&resolved.config.token, Some(KubeToken::File(p)) if *p == dir.0.join("first-token")),
            "{:?}",
            resolved.config.token
        );
    }

    #[test]
    fn explicit_flags_win_and_in_cluster_is_the_fallback() {
        let dir = Dir::new("incluster");
        dir.write("ca.crt", "PEM");
        dir.write("namespace", "trellis-system\n");
        let env = |name: &str| match name {
            "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("6443".to_string()),
            _ => None,
        };
        let kubernetes = KubeFlags {
            kubernetes: true,
            ..KubeFlags::default()
        };
        let resolved = resolve_with(&kubernetes, &env, &dir.0).unwrap().unwrap();
        assert_eq!(resolved.config.url, "https://[fd00::1]:6443");
        assert_eq!(resolved.namespace.as_deref(), Some("trellis-system"));
        assert!(
            matches!(&resolved.config.token, Some(KubeToken::File(p)) if *p == dir.0.join("token"))
        );

        let explicit = KubeFlags {
            api_url: Some("https://api:6443".into()),
            kubeconfig: Some("/ignored".into()),
            ..kubernetes.clone()
        };
        let resolved = resolve_with(&explicit, &env, &dir.0).unwrap().unwrap();
        assert_eq!(resolved.config.url, "https://api:6443");
        assert!(matches!(&resolved.config.ca, KubeCa::File(p) if *p == dir.0.join("ca.crt")));

        assert!(
            resolve_with(&KubeFlags::default(), &env, &dir.0)
                .unwrap()
                .is_none(),
            "no --kubernetes and no URL: no API server"
        );
        let err = resolve_with(&kubernetes, &|_| None, &dir.0).unwrap_err();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        let err = resolve_with(
            &KubeFlags {
                context: Some("dev".into()),
                ..kubernetes
            },
            &env,
            &dir.0,
        )
        .unwrap_err();
        assert!(err.contains("--kube-context"), "{err}");
    }
}
