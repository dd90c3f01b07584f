//! The explicit proxy over TLS (`HTTPS_PROXY=https://…`), so a sandbox's
//! token never crosses the network in clear. Owns: the handshake with the
//! client, and handing the plaintext to the one explicit door
//! ([`explicit::handle`](super::explicit::handle), with the client's own
//! address and admission) over a loopback socket pair made for the
//! connection. The door, its decisions and its relay stay as they are;
//! the bridge copies between the TLS stream and its end of the pair.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

use super::{Admission, Gateway};
use crate::tls::Reloadable;

/// Makes connected loopback pairs: a private listener on 127.0.0.1 whose
/// accepted end is matched to the connecting end by its address; anything
/// else that connects is closed.
#[derive(Debug)]
pub struct Pairing {
    addr: SocketAddr,
    pending: Mutex<HashMap<SocketAddr, oneshot::Sender<TcpStream>>>,
}

impl Pairing {
    /// Binds the private listener; its task ends with `stop`.
    pub async fn new(stop: crate::shutdown::Shutdown) -> std::io::Result<Arc<Pairing>> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let pairing = Arc::new(Pairing {
            addr: listener.local_addr()?,
            pending: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&pairing);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.hard().cancelled() => return,
                };
                let Some(pairing) = weak.upgrade() else {
                    return;
                };
                let Ok((stream, peer)) = accepted else {
                    continue;
                };
                let waiting = pairing.lock().remove(&peer);
                if let Some(tx) = waiting {
                    let _ = tx.send(stream);
                }
            }
        });
        Ok(pairing)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, oneshot::Sender<TcpStream>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Two connected loopback sockets: (the bridge's end, the door's end).
    pub async fn pair(&self) -> std::io::Result<(TcpStream, TcpStream)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        let local = socket.local_addr()?;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(local, tx);
        let result = async {
            let near = socket.connect(self.addr).await?;
            let far = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "pairing"))?
                .map_err(|_| std::io::Error::other("pairing listener gone"))?;
            near.set_nodelay(true)?;
            far.set_nodelay(true)?;
            Ok((near, far))
        }
        .await;
        self.lock().remove(&local);
        result
    }
}

/// One client connection to the proxy listener when it speaks TLS.
pub async fn handle(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    tls: Arc<Reloadable>,
    pairing: Arc<Pairing>,
) {
    let peek = Duration::from_millis(gw.policy().gateway.peek_timeout_ms);
    let mut client = match tls.accept(stream, peek).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "proxy TLS handshake failed");
            return;
        }
    };
    let (mut near, far) = match pairing.pair().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot pair a TLS proxy connection");
            return;
        }
    };
    let door = super::explicit::handle(gw, far, peer, admission);
    let bridge = async {
        // Ends when both directions have: the door closing its end ends
        // the client's, and the client's close reaches the door as EOF.
        let _ = tokio::io::copy_bidirectional(&mut client, &mut near).await;
    };
    tokio::join!(door, bridge);
}
