//! A test host in a network namespace made for one test: a veth pair with a
//! private /30 (10.213.x.0/30), and a TCP server inside the namespace that
//! records every connection it accepts. The host can reach it; a session must
//! not. Removed (namespace and veth) on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Peer {
    ns: String,
    server: Child,
    log: PathBuf,
    pub addr: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let st = Command::new("ip")
        .args(args)
        .stderr(Stdio::piped())
        .output()?;
    if st.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&st.stderr)
        )))
    }
}

impl Peer {
    pub fn start() -> std::io::Result<Peer> {
        let tag = crate::util::rand_hex();
        let ns = format!("hands-it-{}", &tag[..8]);
        let (a, b) = (format!("hv{}a", &tag[..6]), format!("hv{}b", &tag[..6]));
        let octet = u8::from_str_radix(&tag[8..10], 16).unwrap_or(1);
        let host_ip = format!("10.213.{octet}.1");
        let peer_ip = format!("10.213.{octet}.2");
        ip(&["netns", "add", &ns])?;
        let setup = || -> std::io::Result<()> {
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &b, "netns", &ns])?;
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &a])?;
            ip(&["link", "set", &a, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{peer_ip}/30"),
                "dev",
                &b,
            ])?;
            ip(&["-n", &ns, "link", "set", &b, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            let _ = ip(&["netns", "del", &ns]);
            return Err(e);
        }
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("accepted");
        let port = 18_000 + u16::from(octet);
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(format!(
                "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('{peer_ip}', {port}))\ns.listen(16)\n\
                 while True:\n    c, a = s.accept()\n    open('{}', 'a').write(str(a) + '\\n')\n    c.close()",
                log.display()
            ))
            .stdout(Stdio::null())
            .spawn()?;
        let peer = Peer {
            ns,
            server,
            log,
            addr: peer_ip,
            port,
            _dir: dir,
        };
        Ok(peer)
    }

    /// Connects from the host (retrying while the server starts); true once one
    /// connection succeeded.
    pub fn host_can_connect(&self) -> bool {
        let addr: SocketAddr = format!("{}:{}", self.addr, self.port)
            .parse()
            .expect("addr");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                // Wait for the server to record it.
                let until = Instant::now() + Duration::from_secs(2);
                while self.accepted() == 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Connections the server accepted so far.
    pub fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // Deleting the namespace removes its veth end, and with it the pair.
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
