//! The server half of WhatsApp's wire protocol, as far as a linking client
//! needs it: the WebSocket carries a 4-byte `WA` header, then 3-byte
//! length-prefixed frames; the first three frames are a Noise XX handshake
//! (the server proves itself with a certificate chain), every later frame is
//! an AES-GCM sealed binary node.
//!
//! The certificate chain comes from `wacore-noise`'s `test-util`: it is
//! zero-signed, so only a client built with `danger-skip-cert-chain-verify`
//! will accept it. That is the whole point: nothing here can impersonate the
//! real server to a release build.

use buffa::Message as _;
use bytes::BytesMut;
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_websockets::{Message, WebSocketStream};
use wacore::framing::{FrameDecoder, encode_frame};
use wacore::libsignal::protocol::KeyPair;
use wacore::noise::{NoiseCipher, NoiseHandshake};
use wacore_binary::Node;
use wacore_binary::consts::{NOISE_PATTERN_XX, WA_CONN_HEADER};
use waproto::whatsapp as wa;

/// Why a connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the socket (or the WebSocket layer failed).
    #[error("connection closed: {0}")]
    Closed(String),
    /// The peer sent something that is not the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn protocol(e: impl std::fmt::Display) -> WireError {
    WireError::Protocol(e.to_string())
}

/// What the client told us about itself in the last handshake message.
#[derive(Debug, Clone)]
pub enum ClientHello {
    /// A device that is not linked yet and wants `pair-device` refs.
    Registration {
        /// The client's Noise static public key.
        noise_key: [u8; 32],
    },
    /// A linked device logging in: its phone number (the `username`),
    /// device number and Noise static public key.
    Login {
        /// The phone number.
        user: u64,
        /// The device number WhatsApp gave it at `pair-success`.
        device: u32,
        /// The client's Noise static public key.
        noise_key: [u8; 32],
    },
}

/// The server's long-lived Noise identity and the certificate chain that
/// vouches for it.
pub struct ServerIdentity {
    keys: KeyPair,
    cert_chain: Vec<u8>,
}

impl ServerIdentity {
    /// A fresh identity with a matching (test-only) certificate chain.
    pub fn generate() -> Self {
        let keys = KeyPair::generate(&mut rand::rng());
        let cert_chain = wacore_noise::test_util::build_cert_chain_bytes(&public_bytes(&keys));
        Self { keys, cert_chain }
    }
}

pub(crate) fn public_bytes(keys: &KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(keys.public_key.public_key_bytes());
    out
}

/// One accepted client connection after the handshake: sealed frames in both
/// directions, each direction with its own nonce counter.
pub struct SecureConn {
    ws: WebSocketStream<TcpStream>,
    decoder: FrameDecoder,
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
}

impl SecureConn {
    /// Runs the responder side of Noise XX on a freshly upgraded socket.
    pub async fn handshake(
        mut ws: WebSocketStream<TcpStream>,
        identity: &ServerIdentity,
    ) -> Result<(Self, ClientHello), WireError> {
        let mut decoder = FrameDecoder::new();
        let mut header_seen = false;

        // -> e
        let hello = next_frame(&mut ws, &mut decoder, &mut header_seen).await?;
        let hello = wa::HandshakeMessage::decode_from_slice(&hello).map_err(protocol)?;
        let client_eph: [u8; 32] = hello
            .client_hello
            .into_option()
            .and_then(|h| h.ephemeral)
            .and_then(|e| e.try_into().ok())
            .ok_or_else(|| protocol("client hello without a 32-byte ephemeral"))?;

        // <- e, ee, s, es (+ certificate chain as payload)
        let mut noise = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER).map_err(protocol)?;
        noise.authenticate(&client_eph);
        let server_eph = KeyPair::generate(&mut rand::rng());
        let server_eph_pub = public_bytes(&server_eph);
        noise.authenticate(&server_eph_pub);
        noise
            .mix_shared_secret(server_eph.private_key.serialize(), &client_eph)
            .map_err(protocol)?;
        let sealed_static = noise
            .encrypt(&public_bytes(&identity.keys))
            .map_err(protocol)?;
        noise
            .mix_shared_secret(identity.keys.private_key.serialize(), &client_eph)
            .map_err(protocol)?;
        let sealed_cert = noise.encrypt(&identity.cert_chain).map_err(protocol)?;
        let server_hello = wa::HandshakeMessage {
            server_hello: buffa::MessageField::some(wa::handshake_message::ServerHello {
                ephemeral: Some(server_eph_pub.to_vec()),
                r#static: Some(sealed_static),
                payload: Some(sealed_cert),
                ..Default::default()
            }),
            ..Default::default()
        };
        let framed = encode_frame(&server_hello.encode_to_vec(), None).map_err(protocol)?;
        ws.send(Message::binary(framed))
            .await
            .map_err(|e| WireError::Closed(e.to_string()))?;

        // -> s, se (+ client payload)
        let finish = next_frame(&mut ws, &mut decoder, &mut header_seen).await?;
        let finish = wa::HandshakeMessage::decode_from_slice(&finish).map_err(protocol)?;
        let finish = finish
            .client_finish
            .into_option()
            .ok_or_else(|| protocol("expected client finish"))?;
        let sealed_client_static = finish
            .r#static
            .ok_or_else(|| protocol("client finish without static"))?;
        let client_static = noise.decrypt(&sealed_client_static).map_err(protocol)?;
        let noise_key: [u8; 32] = client_static
            .as_slice()
            .try_into()
            .map_err(|_| protocol("client static key is not 32 bytes"))?;
        noise
            .mix_shared_secret(server_eph.private_key.serialize(), &client_static)
            .map_err(protocol)?;
        let payload = noise
            .decrypt(
                &finish
                    .payload
                    .ok_or_else(|| protocol("client finish without payload"))?,
            )
            .map_err(protocol)?;
        let payload = wa::ClientPayload::decode_from_slice(&payload).map_err(protocol)?;
        let hello = match (payload.username, payload.device_pairing_data.is_set()) {
            (Some(user), _) => ClientHello::Login {
                user,
                device: payload.device.unwrap_or(0),
                noise_key,
            },
            (None, true) => ClientHello::Registration { noise_key },
            (None, false) => return Err(protocol("client payload neither logs in nor registers")),
        };

        // The initiator's first split key is its write key, so it is our read key.
        let (client_to_server, server_to_client) = noise.finish().map_err(protocol)?;
        Ok((
            Self {
                ws,
                decoder,
                read: client_to_server,
                write: server_to_client,
                read_counter: 0,
                write_counter: 0,
            },
            hello,
        ))
    }

    /// Seals and sends one node.
    pub async fn send(&mut self, node: &Node) -> Result<(), WireError> {
        // `marshal` already prepends the "uncompressed" flag byte.
        let plain = wacore_binary::marshal::marshal(node).map_err(protocol)?;
        let sealed = self
            .write
            .encrypt_with_counter(self.write_counter, &plain)
            .map_err(protocol)?;
        self.write_counter = self.write_counter.wrapping_add(1);
        let framed = encode_frame(&sealed, None).map_err(protocol)?;
        self.ws
            .send(Message::binary(framed))
            .await
            .map_err(|e| WireError::Closed(e.to_string()))
    }

    /// Receives and opens one node.
    pub async fn recv(&mut self) -> Result<Node, WireError> {
        let mut header_seen = true;
        let frame = next_frame(&mut self.ws, &mut self.decoder, &mut header_seen).await?;
        let mut buf: Vec<u8> = frame.to_vec();
        self.read
            .decrypt_in_place_with_counter(self.read_counter, &mut buf)
            .map_err(protocol)?;
        self.read_counter = self.read_counter.wrapping_add(1);
        let unpacked = wacore_binary::util::unpack(&buf).map_err(protocol)?;
        let node = wacore_binary::marshal::unmarshal_ref(&unpacked).map_err(protocol)?;
        Ok(node.to_owned())
    }

    /// Closes the WebSocket (best effort).
    pub async fn close(mut self) {
        let _ = self.ws.close().await;
    }
}

/// Reads WebSocket messages until one whole frame is buffered. The very first
/// bytes of a connection carry the `WA` header, which is stripped once.
async fn next_frame(
    ws: &mut WebSocketStream<TcpStream>,
    decoder: &mut FrameDecoder,
    header_seen: &mut bool,
) -> Result<BytesMut, WireError> {
    loop {
        if let Some(frame) = decoder.decode_frame() {
            return Ok(frame);
        }
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(WireError::Closed(e.to_string())),
            None => return Err(WireError::Closed("end of stream".into())),
        };
        if message.is_close() {
            return Err(WireError::Closed("close frame".into()));
        }
        if !message.is_binary() {
            continue;
        }
        let payload: &[u8] = message.as_payload();
        let mut data = payload;
        if !*header_seen {
            if !data.starts_with(&WA_CONN_HEADER) {
                return Err(protocol("connection does not start with the WA header"));
            }
            data = &data[WA_CONN_HEADER.len()..];
            *header_seen = true;
        }
        decoder.feed(data);
    }
}
