//! TLS clients for tests of what stands in front of the services (deploy/nginx): rustls,
//! trusting the test CA that logic's push tests use (`logic/src/push/testdata`), whose server
//! certificate names 127.0.0.1 and localhost.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("logic/src/push/testdata")
}

/// rustls on ring, as logic uses it (rustls deprecates ring's provider for lacking
/// post-quantum key exchange; tests need none).
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A TLS connection to `addr`, checked against the test CA for 127.0.0.1.
pub fn connect(addr: SocketAddr) -> TlsStream {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(testdata().join("ca.der")).unwrap();
    roots.add(ca.into()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A WebSocket over TLS (`wss://addr/ws?token=`).
pub fn wss(addr: SocketAddr, token: &str) -> tungstenite::WebSocket<TlsStream> {
    let url = format!("wss://{addr}/ws?token={token}");
    let (ws, _) = tungstenite::client::client(url, connect(addr)).expect("a wss upgrade");
    ws
}

/// The test CA's server certificate and key as PEM files in `dir` (for nginx), by openssl.
pub fn pem_files(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
    for (args, out) in [
        (vec!["x509", "-inform", "DER", "-in", "server.der"], &cert),
        (
            vec!["pkey", "-inform", "DER", "-in", "server.key.der"],
            &key,
        ),
    ] {
        let st = std::process::Command::new("openssl")
            .current_dir(testdata())
            .args(args)
            .arg("-out")
            .arg(out)
            .status()
            .expect("openssl");
        assert!(st.success());
    }
    (cert, key)
}
