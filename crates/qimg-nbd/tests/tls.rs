//! TLS (`--tls-creds`): certificates made with the `openssl` command at test time, real
//! TLS clients (qemu-io, qemu-img, nbdinfo, nbdcopy) over unix and TCP sockets, clients
//! without TLS or without a certificate refused, authz-simple, and qemu-nbd run with the
//! same certificates and options as the oracle for outcomes and messages.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qnbdtls")
        .tempdir()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Credential directories laid out as QEMU expects them.
struct Pki {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (SAN localhost and 127.0.0.1).
    server: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`; subject C=GB, O=qimg test,
    /// CN=client.
    client: PathBuf,
    /// `ca-cert.pem` only: a client that can check the server but has no certificate.
    anon: PathBuf,
    /// A client certificate signed by a different CA.
    rogue: PathBuf,
}

fn openssl(args: &[&str]) {
    ok(60, "openssl", args);
}

/// A CA (self-signed) in `dir/ca-key.pem` + `dir/ca-cert.pem`.
fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        s(&dir.join("ca-key.pem")),
        "-out",
        s(&dir.join("ca-cert.pem")),
        "-days",
        "30",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
}

/// A certificate for `subj` with extensions `ext`, signed by the CA in `ca`, written as
/// `out/{name}-cert.pem` and `out/{name}-key.pem`.
fn make_cert(ca: &Path, out: &Path, name: &str, subj: &str, ext: &str) {
    std::fs::create_dir_all(out).unwrap();
    let key = out.join(format!("{name}-key.pem"));
    let cert = out.join(format!("{name}-cert.pem"));
    let csr = out.join(format!("{name}.csr"));
    let extf = out.join(format!("{name}.ext"));
    std::fs::write(&extf, ext).unwrap();
    openssl(&[
        "req",
        "-utf8",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        s(&key),
        "-out",
        s(&csr),
        "-subj",
        subj,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&csr),
        "-CA",
        s(&ca.join("ca-cert.pem")),
        "-CAkey",
        s(&ca.join("ca-key.pem")),
        "-CAcreateserial",
        "-out",
        s(&cert),
        "-days",
        "30",
        "-extfile",
        s(&extf),
    ]);
    std::fs::remove_file(csr).unwrap();
    std::fs::remove_file(extf).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
}

impl Pki {
    fn new(root: &Path) -> Pki {
        let ca = root.join("ca");
        let other = root.join("other-ca");
        make_ca(&ca, "qimg test CA");
        make_ca(&other, "someone else's CA");
        let p = Pki {
            server: root.join("server"),
            client: root.join("client"),
            anon: root.join("anon"),
            rogue: root.join("rogue"),
        };
        make_cert(
            &ca,
            &p.server,
            "server",
            "/O=qimg test/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        );
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
        make_cert(
            &ca,
            &p.client,
            "client",
            "/C=GB/O=qimg test/CN=client",
            client_ext,
        );
        make_cert(
            &other,
            &p.rogue,
            "client",
            "/C=GB/O=qimg test/CN=client",
            client_ext,
        );
        // The rogue client still trusts the real CA, so only its own certificate is bad.
        std::fs::copy(ca.join("ca-cert.pem"), p.rogue.join("ca-cert.pem")).unwrap();
        std::fs::create_dir_all(&p.anon).unwrap();
        std::fs::copy(ca.join("ca-cert.pem"), p.anon.join("ca-cert.pem")).unwrap();
        p
    }

    /// The server's `--object` for `--tls-creds=tls0`.
    fn object(&self, extra: &str) -> String {
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}{extra}",
            s(&self.server)
        )
    }
}

fn have_all() -> bool {
    have("openssl") && have("qemu-io") && have("qemu-nbd") && have("nbdinfo")
}

/// `nbds+unix://` URI of the default export with the client credentials in `dir`.
fn nbds_unix(sock: &Path, dir: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(sock),
        s(dir)
    )
}

/// qemu-io (or qemu-img) `--image-opts` for the default export over a unix socket with
/// TLS credentials `dir`. QEMU needs a hostname to check the certificate on a unix socket.
fn qemu_unix_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        s(sock)
    )
}

fn client_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", s(dir))
}

/// A server on TCP 127.0.0.1, killed on drop.
struct TcpSrv {
    child: Child,
    port: u16,
}

impl TcpSrv {
    fn start(prog: &str, args: &[&str]) -> TcpSrv {
        // A port the kernel just handed out and we released: free unless another test
        // grabs it in the next moment, which the retry below covers.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(prog)
                .args(["-b", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                // -t is always given, so a probing connection does not end the server.
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TcpSrv { child, port };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("{prog} did not start on TCP");
    }
}

impl Drop for TcpSrv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The same qemu-io writes applied to a raw reference directly and through qimg-nbd with
/// TLS (unix socket, then TCP) leave identical bytes; qemu-img convert and nbdcopy read
/// the export back over TLS identically.
#[test]
fn tls_clients_read_and_write_like_a_raw_reference() {
    if !have_all() || !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let reference = d.path().join("ref.raw");
    let img = d.path().join("img.raw");
    make_raw(&reference, 8 << 20);
    make_raw(&img, 8 << 20);
    let unix_ops = [
        "write -P 0xaa 0 64k",
        "write -P 0x55 1048577 3000",
        "write -z 2M 128k",
        "aio_write -P 0x11 5M 4k",
        "aio_write -P 0x22 5242881 4095",
        "aio_flush",
    ];
    let tcp_ops = ["write -P 0x66 3M 1M", "write -P 0x33 8388096 512", "flush"];
    let script = |ops: &[&str]| -> Vec<String> {
        ops.iter()
            .flat_map(|o| ["-c".to_string(), o.to_string()])
            .collect()
    };
    let mut direct: Vec<String> = vec!["-f".into(), "raw".into()];
    direct.extend(script(&unix_ops));
    direct.extend(script(&tcp_ops));
    direct.push(s(&reference).into());
    let direct: Vec<&str> = direct.iter().map(String::as_str).collect();
    ok(60, "qemu-io", &direct);

    let obj = pki.object("");
    let sock = d.path().join("s");
    let cobj = client_object(&pki.client);
    let opts = qemu_unix_opts(&sock);
    let srv_args = [
        "-t",
        "-e",
        "0",
        "--object",
        &obj,
        "--tls-creds=tls0",
        "-f",
        "raw",
        s(&img),
    ];
    let srv = Srv::start(qimg_nbd(), &sock, &srv_args);
    let mut via: Vec<String> = vec!["--object".into(), cobj.clone(), "--image-opts".into()];
    via.extend(script(&unix_ops));
    via.push(opts.clone());
    let via: Vec<&str> = via.iter().map(String::as_str).collect();
    ok(60, "qemu-io", &via);
    // The image is locked while served: one server at a time.
    drop(srv);

    // TCP: QEMU checks the server certificate against the address (IP SAN).
    let tcp = TcpSrv::start(qimg_nbd(), &srv_args);
    let topts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},tls-creds=tls0",
        tcp.port
    );
    let mut via: Vec<String> = vec!["--object".into(), cobj.clone(), "--image-opts".into()];
    via.extend(script(&tcp_ops));
    via.push(topts.clone());
    let via: Vec<&str> = via.iter().map(String::as_str).collect();
    ok(60, "qemu-io", &via);

    // Read back over TLS with two clients and compare with the reference.
    let out1 = d.path().join("out1.raw");
    ok(
        120,
        "qemu-img",
        &[
            "convert",
            "--object",
            &cobj,
            "--image-opts",
            &topts,
            "-O",
            "raw",
            s(&out1),
        ],
    );
    assert!(std::fs::read(&out1).unwrap() == std::fs::read(&reference).unwrap());
    let turi = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        tcp.port,
        s(&pki.client)
    );
    let out2 = d.path().join("out2.raw");
    ok(120, "nbdcopy", &[&turi, s(&out2)]);
    assert!(std::fs::read(&out2).unwrap() == std::fs::read(&reference).unwrap());

    // A whole image written through nbdcopy over TLS.
    let src = d.path().join("src.raw");
    make_raw(&src, 8 << 20);
    ok(
        60,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 100k 3M", s(&src)],
    );
    ok(120, "nbdcopy", &[s(&src), &turi]);
    drop(tcp);

    // And read back on a unix socket (read-only export), by nbdcopy and qemu-img.
    let ro_args = [
        "-t",
        "-e",
        "0",
        "-r",
        "--object",
        &obj,
        "--tls-creds=tls0",
        "-f",
        "raw",
        s(&img),
    ];
    let srv = Srv::start(qimg_nbd(), &sock, &ro_args);
    let out3 = d.path().join("out3.raw");
    ok(120, "nbdcopy", &[&nbds_unix(&sock, &pki.client), s(&out3)]);
    assert!(std::fs::read(&out3).unwrap() == std::fs::read(&src).unwrap());
    let out4 = d.path().join("out4.raw");
    ok(
        120,
        "qemu-img",
        &[
            "convert",
            "--object",
            &cobj,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            s(&out4),
        ],
    );
    assert!(std::fs::read(&out4).unwrap() == std::fs::read(&src).unwrap());
    drop(srv);
}

/// nbdinfo over TLS reports the export like qemu-nbd does with the same certificates.
#[test]
fn nbdinfo_over_tls_matches_qemu_nbd() {
    if !have_all() {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 4 << 20);
    let obj = pki.object("");
    let args = [
        "-t",
        "-r",
        "--object",
        &obj,
        "--tls-creds=tls0",
        "-f",
        "raw",
        s(&img),
    ];
    let mut outs = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let srv = Srv::start(prog, &sock, &args);
        let out = ok(30, "nbdinfo", &[&nbds_unix(&sock, &pki.client)]);
        assert!(
            out.contains("protocol: newstyle-fixed with TLS"),
            "{prog}: {out}"
        );
        outs.push(out);
        drop(srv);
    }
    assert_eq!(outs[0], outs[1]);
}

/// Clients that do not start TLS are refused with qemu-nbd's replies, and the server goes
/// on serving TLS clients afterwards.
#[test]
fn clients_without_tls_are_refused() {
    if !have_all() {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 4 << 20);
    let obj = pki.object("");
    let mut seen = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let srv = Srv::start(
            prog,
            &sock,
            &[
                "-t",
                "-e",
                "0",
                "--object",
                &obj,
                "--tls-creds=tls0",
                "-f",
                "raw",
                s(&img),
            ],
        );
        let plain = format!("nbd+unix:///?socket={}", s(&sock));
        let a = run(30, "nbdinfo", &[&plain]);
        assert!(!a.status.success(), "{prog}: plain nbdinfo was served");
        let b = run(30, "nbdinfo", &["--list", &plain]);
        assert!(
            !b.status.success(),
            "{prog}: plain nbdinfo --list was served"
        );
        let c = run(30, "qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain]);
        assert!(!c.status.success(), "{prog}: plain qemu-io was served");
        let sock_s = s(&sock).to_string();
        seen.push(
            [stderr_of(&a), stderr_of(&b), stderr_of(&c)]
                .map(|e| e.replace(&sock_s, "SOCK"))
                .to_vec(),
        );
        // Still serving: a TLS client gets through.
        let out = ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
        assert_eq!(out.trim(), "4194304");
        drop(srv);
    }
    assert!(
        seen[0][2].contains("TLS negotiation required"),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen[0], seen[1]);
}

/// verify-peer=on (the default) refuses clients without a certificate or with one from
/// another CA; verify-peer=off lets a client without a certificate in. qemu-nbd agrees.
#[test]
fn verify_peer_requires_a_client_certificate() {
    if !have_all() {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 4 << 20);
    for prog in [qimg_nbd(), "qemu-nbd"] {
        for (extra, anon_ok) in [
            ("", false),
            (",verify-peer=on", false),
            (",verify-peer=off", true),
        ] {
            let obj = pki.object(extra);
            let sock = d.path().join("s");
            let srv = Srv::start(
                prog,
                &sock,
                &[
                    "-t",
                    "-e",
                    "0",
                    "--object",
                    &obj,
                    "--tls-creds=tls0",
                    "-f",
                    "raw",
                    s(&img),
                ],
            );
            let anon = run(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.anon)]);
            assert_eq!(anon.status.success(), anon_ok, "{prog}{extra}: {anon:?}");
            let rogue = run(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.rogue)]);
            assert_eq!(rogue.status.success(), anon_ok, "{prog}{extra}: {rogue:?}");
            // qemu-io without a certificate, too.
            let qa = run(
                30,
                "qemu-io",
                &[
                    "--object",
                    &client_object(&pki.anon),
                    "--image-opts",
                    "-c",
                    "read 0 4k",
                    &qemu_unix_opts(&sock),
                ],
            );
            assert_eq!(qa.status.success(), anon_ok, "{prog}{extra}: {qa:?}");
            // The good client always gets in, after the refused ones.
            let good = ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
            assert_eq!(good.trim(), "4194304");
            drop(srv);
        }
    }
}

/// authz-simple: only the named client identity gets in, with the DN written as QEMU
/// prints it; qemu-nbd agrees on every identity.
#[test]
fn authz_simple_matches_qemu_nbd() {
    if !have_all() {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 4 << 20);
    let cases = [
        ("C=GB,,O=qimg test,,CN=client", true),
        ("CN=client,,O=qimg test,,C=GB", false),
        ("CN=client", false),
    ];
    for prog in [qimg_nbd(), "qemu-nbd"] {
        for (identity, allowed) in cases {
            for (verify, expect) in [("", allowed), (",verify-peer=off", true)] {
                let obj = pki.object(verify);
                let authz = format!("authz-simple,id=auth0,identity={identity}");
                let sock = d.path().join("s");
                let srv = Srv::start(
                    prog,
                    &sock,
                    &[
                        "-t",
                        "--object",
                        &obj,
                        "--object",
                        &authz,
                        "--tls-creds=tls0",
                        "--tls-authz=auth0",
                        "-f",
                        "raw",
                        s(&img),
                    ],
                );
                let o = run(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
                assert_eq!(
                    o.status.success(),
                    expect,
                    "{prog} identity={identity}{verify}: {o:?}"
                );
                drop(srv);
            }
        }
    }
}

/// The distinguished name of an awkward client certificate (escaped characters, a
/// multi-valued RDN, UTF-8, attribute types with long names) is printed in the denial
/// message exactly as qemu-nbd prints it, and that text, as identity, lets the client in.
#[test]
fn authz_distinguished_names_are_formatted_like_qemu() {
    if !have_all() {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let odd = d.path().join("odd");
    make_cert(
        &d.path().join("ca"),
        &odd,
        "client",
        "/C=GB/O=Acme\\+x;y<z>\"q\"/CN=a+OU=b/L= sp#/ST=Z\u{fc}rich/emailAddress=a@b.c\
         /DC=example/UID=u1/serialNumber=42/title=t",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    );
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let obj = pki.object("");
    let mut denied = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let mut srv = Srv::start(
            prog,
            &sock,
            &[
                "-t",
                "--object",
                &obj,
                "--object",
                "authz-simple,id=auth0,identity=nobody",
                "--tls-creds=tls0",
                "--tls-authz=auth0",
                "-f",
                "raw",
                s(&img),
            ],
        );
        let o = run(30, "nbdinfo", &["--size", &nbds_unix(&sock, &odd)]);
        assert!(!o.status.success());
        srv.signal(libc::SIGTERM);
        assert!(srv.wait_exit(10).is_some(), "{prog} did not stop");
        let mut err = String::new();
        srv.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let line = err
            .lines()
            .find(|l| l.contains("authz check for"))
            .unwrap_or_else(|| panic!("{prog}: {err}"))
            .to_string();
        denied.push(line.split_once(": ").unwrap().1.to_string());
    }
    assert_eq!(denied[0], denied[1]);
    // The DN as printed, written as a QemuOpts value (commas doubled), is let in.
    let dn = denied[0]
        .strip_prefix("option negotiation failed: TLS x509 authz check for ")
        .and_then(|r| r.strip_suffix(" is denied"))
        .unwrap()
        .to_string();
    assert!(dn.starts_with("C=GB,O=Acme\\+x\\;y"), "{dn}");
    let authz = format!("authz-simple,id=auth0,identity={}", dn.replace(',', ",,"));
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "--object",
            &obj,
            "--object",
            &authz,
            "--tls-creds=tls0",
            "--tls-authz=auth0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &odd)]);
    drop(srv);
}

/// Command-line errors around TLS: the same message and exit status as qemu-nbd.
#[test]
fn tls_option_errors_match_qemu_nbd() {
    if !have("openssl") || !have("qemu-nbd") {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let sv = s(&pki.server).to_string();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    // Directories with one file missing, and one with a key that is not the cert's.
    let partial = |name: &str, skip: &str| -> String {
        let p = d.path().join(name);
        std::fs::create_dir(&p).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            if f != skip {
                std::fs::copy(pki.server.join(f), p.join(f)).unwrap();
            }
        }
        s(&p).to_string()
    };
    let noca = partial("noca", "ca-cert.pem");
    let nocert = partial("nocert", "server-cert.pem");
    let nokey = partial("nokey", "server-key.pem");
    let mismatch = partial("mismatch", "server-key.pem");
    std::fs::copy(
        pki.client.join("client-key.pem"),
        Path::new(&mismatch).join("server-key.pem"),
    )
    .unwrap();
    let badca = partial("badca", "ca-cert.pem");
    std::fs::write(Path::new(&badca).join("ca-cert.pem"), "garbage\n").unwrap();

    let x509 =
        |dir: &str, extra: &str| format!("tls-creds-x509,id=tls0,endpoint=server,dir={dir}{extra}");
    let cases: Vec<Vec<String>> = vec![
        vec!["--tls-creds=tls0".into()],
        vec!["--object".into(), x509(&sv, ""), "--tls-creds=tls1".into()],
        vec![
            "--object".into(),
            x509("/nonexistent", ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(s(&empty), ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&noca, ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&noca, ",verify-peer=off"),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&nocert, ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&nokey, ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&mismatch, ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            x509(&badca, ""),
            "--tls-creds=tls0".into(),
        ],
        vec![
            "--object".into(),
            format!("tls-creds-x509,id=tls0,endpoint=client,dir={sv}"),
            "--tls-creds=tls0".into(),
        ],
        vec!["--object".into(), x509(&sv, ",verify-peer=maybe")],
        vec!["--object".into(), x509(&sv, ",bogus=1")],
        vec![
            "--object".into(),
            format!("tls-creds-x509,endpoint=server,dir={sv}"),
        ],
        vec![
            "--object".into(),
            "tls-creds-x509,id=tls0,endpoint=server".into(),
        ],
        vec![
            "--object".into(),
            format!("tls-creds-x509,id=tls0,endpoint=bogus,dir={sv}"),
        ],
        vec![
            "--object".into(),
            x509(&sv, ""),
            "--object".into(),
            x509(&sv, ""),
        ],
        vec!["--object".into(), "foo,id=x".into()],
        vec!["--object".into(), "authz-simple,id=a0".into()],
        vec![
            "--object".into(),
            "authz-simple,id=a0,identity=CN=x".into(),
            "--tls-creds=a0".into(),
        ],
        vec!["--object".into(), x509(&sv, ""), "--tls-authz=a0".into()],
        vec![
            "--object".into(),
            x509(&sv, ""),
            "--tls-creds=tls0".into(),
            "--tls-hostname=foo".into(),
        ],
        vec![
            "--object".into(),
            x509(&sv, ""),
            "--tls-creds=tls0".into(),
            "-c".into(),
            "/dev/nbd0".into(),
        ],
    ];
    for case in &cases {
        let mut args: Vec<&str> = case.iter().map(String::as_str).collect();
        args.extend(["-f", "raw", s(&img)]);
        let ours = run(10, qimg_nbd(), &args);
        let theirs = run(10, "qemu-nbd", &args);
        assert_eq!(ours.status.code(), Some(1), "{case:?}: {ours:?}");
        assert_eq!(theirs.status.code(), Some(1), "{case:?}: {theirs:?}");
        assert_eq!(
            stderr_of(&ours).replacen("qimg-nbd:", "qemu-nbd:", 1),
            stderr_of(&theirs),
            "{case:?}"
        );
    }
    // A PEM file that is not one: both refuse; GnuTLS and rustls explain it differently.
    let badcert = partial("badcert", "server-cert.pem");
    std::fs::write(Path::new(&badcert).join("server-cert.pem"), "garbage\n").unwrap();
    let obj = x509(&badcert, "");
    let args = ["--object", &obj, "--tls-creds=tls0", "-f", "raw", s(&img)];
    let ours = run(10, qimg_nbd(), &args);
    assert_eq!(ours.status.code(), Some(1));
    let msg = format!("qimg-nbd: Unable to import server certificate {badcert}/server-cert.pem");
    assert!(stderr_of(&ours).starts_with(&msg), "{ours:?}");

    // What QEMU has and rustls does not: refused with a message, not ignored.
    let psk = d.path().join("psk");
    std::fs::create_dir(&psk).unwrap();
    std::fs::write(psk.join("keys.psk"), "qemu:0123456789abcdef\n").unwrap();
    let pobj = format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", s(&psk));
    for args in [
        vec!["--object", &pobj, "--tls-creds=tls0"],
        vec![
            "--object",
            &x509(&sv, ",priority=NORMAL"),
            "--tls-creds=tls0",
        ],
    ] {
        let mut args = args.clone();
        args.extend(["-f", "raw", s(&img)]);
        let o = run(10, qimg_nbd(), &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr_of(&o).contains("not supported"), "{o:?}");
    }
}

/// One connection on a raw socket, for what no real client does.
struct Raw(UnixStream);

impl Raw {
    fn hello(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw(s)
    }

    fn opt(&mut self, o: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        let _ = self.0.write_all(&b);
    }

    /// One option reply: (option, type, data), or None if the server hung up.
    fn reply(&mut self) -> Option<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).ok()?;
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let l = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(l <= 4096);
        let mut d = vec![0u8; l];
        self.0.read_exact(&mut d).ok()?;
        Some((o, t, d))
    }

    /// Whether the server closes the connection (EOF or reset) within the read timeout;
    /// anything it sends first (a TLS alert) is skipped, up to a bound.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        for _ in 0..64 {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
        false
    }
}

/// Option replies before TLS, byte for byte against qemu-nbd: every option but STARTTLS
/// gets NBD_REP_ERR_TLS_REQD (ABORT too, then the connection ends), EXPORT_NAME and a
/// STARTTLS with a payload end the connection.
#[test]
fn options_before_tls_answer_like_qemu_nbd() {
    if !have("openssl") || !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let obj = pki.object("");
    let info = [0u8, 0, 0, 0, 0, 0];
    let mut results = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let srv = Srv::start(
            prog,
            &sock,
            &[
                "-t",
                "-e",
                "0",
                "--object",
                &obj,
                "--tls-creds=tls0",
                "-f",
                "raw",
                s(&img),
            ],
        );
        let mut log = Vec::new();
        let mut r = Raw::hello(&sock);
        for (o, data) in [
            (3u32, &[][..]),
            (6, &info[..]),
            (7, &info[..]),
            (8, &[][..]),
            (9, &[][..]),
            (10, &[][..]),
            (11, &[][..]),
            (4, &[][..]),
            (99, &b"xyz"[..]),
        ] {
            r.opt(o, data);
            log.push(format!("{:?}", r.reply()));
        }
        r.opt(2, &[]);
        log.push(format!("{:?} closed={}", r.reply(), r.closed()));
        let mut r = Raw::hello(&sock);
        r.opt(1, b"");
        log.push(format!("export-name closed={}", r.closed()));
        let mut r = Raw::hello(&sock);
        r.opt(5, b"x");
        log.push(format!("{:?} closed={}", r.reply(), r.closed()));
        results.push(log);
        // Still serving.
        ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
        drop(srv);
    }
    assert_eq!(results[0], results[1]);
    assert!(results[0][0].contains("2147483653"), "{:?}", results[0]);
}

/// Broken TLS handshakes (garbage after STARTTLS, a client that stalls or hangs up
/// mid-handshake) cost that client its connection and nothing else; the handshake limit
/// covers the TLS handshake.
#[test]
fn failed_tls_handshakes_close_only_that_client() {
    if !have("openssl") || !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let obj = pki.object("");
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "-e",
            "0",
            "--handshake-limit=2",
            "--object",
            &obj,
            "--tls-creds=tls0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    // A client that stalls right after STARTTLS is held while others are served.
    let mut staller = Raw::hello(&sock);
    staller.opt(5, &[]);
    assert_eq!(staller.reply().map(|r| r.1), Some(1));
    // Garbage instead of a ClientHello, of several sizes, some with a huge record length.
    for junk in [
        &b"\x16\x03\x01\xff\xffhello"[..],
        &[0u8; 5][..],
        &[0x17u8; 70000][..],
        &b"GET / HTTP/1.0\r\n\r\n"[..],
    ] {
        let mut r = Raw::hello(&sock);
        r.opt(5, &[]);
        assert_eq!(r.reply().map(|r| r.1), Some(1));
        let _ = r.0.write_all(junk);
        assert!(r.closed());
    }
    // A client that pipelines junk right behind STARTTLS, and one that hangs up.
    let mut r = Raw::hello(&sock);
    let mut b = b"IHAVEOPT\0\0\0\x05\0\0\0\0".to_vec();
    b.extend_from_slice(&[0x16, 3, 3, 0, 1, 0]);
    r.0.write_all(&b).unwrap();
    assert_eq!(r.reply().map(|r| r.1), Some(1));
    assert!(r.closed());
    let mut r = Raw::hello(&sock);
    r.opt(5, &[]);
    drop(r);
    let out = ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
    assert_eq!(out.trim(), "1048576");
    // The staller is cut off by the handshake limit.
    let t0 = Instant::now();
    assert!(staller.closed());
    assert!(t0.elapsed() < Duration::from_secs(8));
    let out = ok(30, "nbdinfo", &["--size", &nbds_unix(&sock, &pki.client)]);
    assert_eq!(out.trim(), "1048576");
    drop(srv);
}

/// STARTTLS on a server without TLS is refused with NBD_REP_ERR_POLICY (and a second
/// STARTTLS after TLS with NBD_REP_ERR_INVALID, which nbdinfo never sends; covered by the
/// handshake code path only).
#[test]
fn starttls_without_tls_configured_is_refused() {
    if !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let mut results = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let srv = Srv::start(prog, &sock, &["-t", "-e", "0", "-f", "raw", s(&img)]);
        let mut r = Raw::hello(&sock);
        r.opt(5, &[]);
        let a = r.reply();
        r.opt(5, b"x");
        let b = r.reply();
        results.push(format!("{a:?} {b:?}"));
        // nbdinfo insisting on TLS fails against a plain server.
        let dir = d.path().join("nocreds");
        std::fs::create_dir_all(&dir).unwrap();
        let o = run(30, "nbdinfo", &["--size", &nbds_unix(&sock, &dir)]);
        assert!(!o.status.success());
        drop(srv);
    }
    assert_eq!(results[0], results[1]);
    assert!(results[0].contains("2147483650"), "{}", results[0]);
}

/// The library: a `TlsConfig` from a credential directory (with an authz identity) in the
/// `ServerConfig` of an embedded server on a TCP listener the caller owns.
#[test]
fn embedded_server_with_tls_config() {
    if !have_all() {
        return;
    }
    use qimg::open::{open_image, OpenOptions};
    use qimg_nbd::{Export, Server, ServerConfig, TlsConfig};
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    make_raw(&img, 2 << 20);
    let image = open_image(
        &img,
        &OpenOptions {
            format: Some("raw".into()),
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(TlsConfig::from_dir(&d.path().join("nowhere"), true)
        .unwrap_err()
        .to_string()
        .starts_with("Unable to access credentials"));
    let tls = TlsConfig::from_dir(&pki.server, true)
        .unwrap()
        .with_authz("C=GB,O=qimg test,CN=client");
    let config = ServerConfig {
        max_connections: 0,
        tls: Some(tls),
        ..ServerConfig::default()
    };
    let server = Server::new(vec![Export::new("disk", image)], config).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let s1 = server.clone();
    let t = std::thread::spawn(move || s1.serve(tcp.into()));
    let list = ok(
        30,
        "nbdinfo",
        &[
            "--list",
            &format!(
                "nbds://127.0.0.1:{port}/?tls-certificates={}",
                s(&pki.client)
            ),
        ],
    );
    assert!(list.contains("export=\"disk\""), "{list}");
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
    );
    let cobj = client_object(&pki.client);
    let w = ok(
        30,
        "qemu-io",
        &[
            "--object",
            &cobj,
            "--image-opts",
            "-c",
            "write -P 0x5a 12345 100000",
            "-c",
            "read -P 0x5a 12345 100000",
            &opts,
        ],
    );
    assert!(!w.contains("failed"), "{w}");
    let plain = run(
        30,
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{port}")],
    );
    assert!(!plain.status.success());
    let t0 = Instant::now();
    server.shutdown_handle().shutdown();
    t.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Dropping the server closes the image (and its lock).
    drop(server);
    let direct = ok(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 12345 100000", s(&img)],
    );
    assert!(!direct.contains("failed"), "{direct}");
}

/// fio random writes and reads with checksums over four TLS connections: concurrent
/// requests and replies on each encrypted connection keep their data. fio cannot be handed
/// certificates (it refuses URIs that name local files), so the server does not ask for
/// one and fio does not check the server's.
#[test]
fn fio_verify_over_tls_multi_conn() {
    if !have("openssl") || !have("fio") {
        return;
    }
    let d = tmp();
    let pki = Pki::new(d.path());
    let img = d.path().join("img.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let obj = pki.object(",verify-peer=off");
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "-e",
            "0",
            "--object",
            &obj,
            "--tls-creds=tls0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    let out = run(
        180,
        "fio",
        &[
            "--name=tls",
            "--ioengine=nbd",
            &format!(
                "--uri=nbds+unix:///?socket={}&tls-verify-peer=false",
                s(&sock)
            ),
            "--rw=randrw",
            "--bsrange=512-256k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--loops=2",
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    drop(srv);
}
