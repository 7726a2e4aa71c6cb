//! A TCP proxy on loopback whose downstream direction (server to client)
//! can be limited to a rate, to play a slow client over a slow link.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct Throttle {
    pub port: u16,
    /// Bytes per second towards the client; 0 is unlimited.
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Throttle {
    /// Proxies every connection on a free port to `127.0.0.1:target`.
    pub fn start(target: u16) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let t = Throttle {
            port,
            rate: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (rate, stop, conns) = (t.rate.clone(), t.stop.clone(), t.conns.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        small_receive_buffer(&server);
                        let mut list = conns.lock().unwrap();
                        list.push(client.try_clone().unwrap());
                        list.push(server.try_clone().unwrap());
                        drop(list);
                        pipe(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            None,
                        );
                        pipe(server, client, Some(rate.clone()));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        t
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

/// A fixed, small receive buffer towards the server, so the kernel does not
/// grow it (loopback buffers autotune to megabytes) and a slow read here is
/// felt upstream at once, as on a real slow link.
fn small_receive_buffer(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 32 * 1024;
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Copies `from` to `to` until either side closes, at most `rate` bytes per
/// second when one is set.
fn pipe(mut from: TcpStream, mut to: TcpStream, rate: Option<Arc<AtomicU64>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let limit = rate.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
            // Small reads under a limit, so the rate holds over short spans.
            let want = if limit == 0 {
                buf.len()
            } else {
                (limit as usize / 20).clamp(256, buf.len())
            };
            let n = match from.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if limit > 0 {
                thread::sleep(Duration::from_secs_f64(n as f64 / limit as f64));
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}
