//! X25519 between a round's `e_V` and each accepted member's `E_i`.
//!
//! Data flow: finalizing a psk-ecdhe batch restores `e_V` from the
//! [`RoundState`](super::RoundState) once ([`RoundDh::new`]) and runs one
//! exchange per accepted entry, whose result feeds the session extract.
//! This is the verifier's largest per-member cost in psk-ecdhe, so when the
//! crate is built for the UDC (feature `service`) it uses aws-lc's X25519
//! (assembly on x86-64 and aarch64); the sans-IO core alone keeps
//! x25519-dalek through [`suite`](crate::protocol::suite). Both reject an
//! all-zero shared secret; a test checks they agree.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::protocol::suite::{CryptoError, Key32};

/// V's round key, ready for one exchange per member.
pub(crate) struct RoundDh {
    #[cfg(feature = "service")]
    key: aws_lc_rs::agreement::PrivateKey,
    #[cfg(not(feature = "service"))]
    key: crate::protocol::suite::EphemeralKeyPair,
}

impl core::fmt::Debug for RoundDh {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RoundDh(<redacted>)")
    }
}

impl RoundDh {
    /// Restores `e_V` from its 32 secret bytes.
    #[cfg(feature = "service")]
    pub(crate) fn new(secret: &Key32) -> Result<Self, CryptoError> {
        use aws_lc_rs::agreement::{PrivateKey, X25519};
        let key = PrivateKey::from_private_key(&X25519, secret.expose())
            .map_err(|_| CryptoError::InvalidKey)?;
        Ok(Self { key })
    }

    /// Restores `e_V` from its 32 secret bytes.
    #[cfg(not(feature = "service"))]
    pub(crate) fn new(secret: &Key32) -> Result<Self, CryptoError> {
        Ok(Self {
            key: crate::protocol::suite::EphemeralKeyPair::from_secret_bytes(secret.expose()),
        })
    }

    /// `X25519(e_V, peer)`; an all-zero result (a small-order `E_i`) is
    /// [`CryptoError::NonContributory`].
    #[cfg(feature = "service")]
    pub(crate) fn agree(&self, peer: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        use aws_lc_rs::agreement::{UnparsedPublicKey, X25519, agree};
        let mut out = Zeroizing::new([0u8; 32]);
        // aws-lc refuses the all-zero output itself; the check below keeps
        // the rule independent of that.
        agree(
            &self.key,
            UnparsedPublicKey::new(&X25519, peer),
            CryptoError::NonContributory,
            |shared| {
                if shared.len() != 32 {
                    return Err(CryptoError::NonContributory);
                }
                out.copy_from_slice(shared);
                Ok(())
            },
        )?;
        if bool::from(out.ct_eq(&[0u8; 32])) {
            return Err(CryptoError::NonContributory);
        }
        Ok(out)
    }

    /// `X25519(e_V, peer)`; an all-zero result (a small-order `E_i`) is
    /// [`CryptoError::NonContributory`].
    #[cfg(not(feature = "service"))]
    pub(crate) fn agree(&self, peer: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let shared = self.key.diffie_hellman(peer)?;
        let out = Zeroizing::new(*shared.expose());
        if bool::from(out.ct_eq(&[0u8; 32])) {
            return Err(CryptoError::NonContributory);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::suite::EphemeralKeyPair;

    #[test]
    fn agrees_with_the_reference_x25519_and_rejects_small_order_points() {
        let mut rng = super::super::tests::TestRng(3);
        for _ in 0..50 {
            let v = EphemeralKeyPair::generate(&mut rng);
            let m = EphemeralKeyPair::generate(&mut rng);
            let dh = RoundDh::new(&v.secret_bytes()).unwrap();
            let fast = dh.agree(&m.public()).unwrap();
            let reference = m.diffie_hellman(&v.public()).unwrap();
            assert_eq!(&*fast, reference.expose());
        }
        let dh = RoundDh::new(&Key32::from_bytes([9; 32])).unwrap();
        let mut one = [0u8; 32];
        one[0] = 1;
        for small in [[0u8; 32], one] {
            assert_eq!(dh.agree(&small).unwrap_err(), CryptoError::NonContributory);
        }
        assert!(format!("{dh:?}").contains("redacted"));
    }
}
