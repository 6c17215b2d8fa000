//! `dapgw keys`: the key material a UDC deployment needs, and the loaders
//! the UDC uses to read it back at start.
//!
//! ```text
//! keys init --> master.key, storage.key, root.key (offline), root.pub,
//!               signing.key (online), signing.cert (root-signed KeyCertificate)
//! keys rotate-signing-key --> signing.key, signing.cert (key_version + 1)
//! keys members --> credentials JSON (factory) + registry import JSON (UDC)
//! ```
//!
//! Every file holds lowercase hex and a newline (the certificate: the hex of
//! the complete 106-byte KeyCertificate message). Secrets are written with
//! mode 0600, never printed, and zeroized after use.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use zeroize::Zeroizing;

use crate::protocol::keys::{
    CredentialFile, MasterSecret, MemberCredential, MemberKeyDeriver, StorageKey,
    sign_key_certificate,
};
use crate::protocol::suite::{Key16, SigningKey};
use crate::protocol::wire::KeyCertificate;

/// File names written by [`init`] inside its directory.
pub mod files {
    /// The master secret MS (32 bytes).
    pub const MASTER: &str = "master.key";
    /// The storage key (16 bytes).
    pub const STORAGE: &str = "storage.key";
    /// The offline root Ed25519 seed (32 bytes): move it off the UDC host.
    pub const ROOT: &str = "root.key";
    /// The root public key members pin.
    pub const ROOT_PUB: &str = "root.pub";
    /// The online signing key seed (32 bytes).
    pub const SIGNING: &str = "signing.key";
    /// The root's certificate of the online key.
    pub const SIGNING_CERT: &str = "signing.cert";
}

/// A key file could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// An I/O failure on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file does not hold what it should (its content is never quoted).
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// A refused argument.
    #[error("{0}")]
    Usage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` with `mode` (also on an existing file).
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeysError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(mode);
        let mut f = opts.open(path).map_err(io_err(path))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
        f.write_all(contents).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        let mut f = opts.open(path).map_err(io_err(path))?;
        f.write_all(contents).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))
    }
}

fn write_secret_hex(path: &Path, bytes: &[u8]) -> Result<(), KeysError> {
    let mut text = Zeroizing::new(hex::encode(bytes));
    text.push('\n');
    write_file(path, text.as_bytes(), 0o600)
}

/// Reads a hex file of exactly `N` bytes.
pub fn read_hex<const N: usize>(path: &Path) -> Result<Zeroizing<[u8; N]>, KeysError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    let mut out = Zeroizing::new([0u8; N]);
    hex::decode_to_slice(text.trim(), &mut out[..]).map_err(|_| KeysError::Format {
        path: path.to_path_buf(),
        what: "expected lowercase hex of the right length",
    })?;
    Ok(out)
}

/// Reads the master secret.
pub fn load_master(path: &Path) -> Result<MasterSecret, KeysError> {
    Ok(MasterSecret::from_bytes(*read_hex::<32>(path)?))
}

/// Reads the storage key.
pub fn load_storage_key(path: &Path) -> Result<StorageKey, KeysError> {
    Ok(StorageKey::from_bytes(&Key16::from_bytes(*read_hex::<16>(
        path,
    )?)))
}

/// Reads an Ed25519 signing key seed.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeysError> {
    Ok(SigningKey::from_seed(&*read_hex::<32>(path)?))
}

/// Reads a key certificate.
pub fn load_key_cert(path: &Path) -> Result<KeyCertificate, KeysError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let bytes = hex::decode(text.trim()).map_err(|_| KeysError::Format {
        path: path.to_path_buf(),
        what: "expected hex",
    })?;
    KeyCertificate::decode(&Bytes::from(bytes)).map_err(|_| KeysError::Format {
        path: path.to_path_buf(),
        what: "not a KeyCertificate message",
    })
}

fn random<const N: usize>() -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    rand_core::Rng::fill_bytes(&mut rand_core::UnwrapErr(getrandom::SysRng), &mut out[..]);
    out
}

/// Certifies a fresh online key under `root` and writes it and its
/// certificate into `dir`.
fn new_signing_key(
    dir: &Path,
    root: &SigningKey,
    key_id: u32,
    key_version: u32,
) -> Result<KeyCertificate, KeysError> {
    let seed = random::<32>();
    let online = SigningKey::from_seed(&seed);
    let public_key = online.verifying_key().to_bytes();
    let cert = KeyCertificate {
        key_id,
        key_version,
        public_key,
        root_sig: sign_key_certificate(root, key_id, key_version, &public_key),
    };
    write_secret_hex(&dir.join(files::SIGNING), &seed[..])?;
    let mut text = hex::encode(cert.to_bytes());
    text.push('\n');
    write_file(&dir.join(files::SIGNING_CERT), text.as_bytes(), 0o644)?;
    Ok(cert)
}

/// `dapgw keys init --out DIR`: writes a fresh master secret, storage key,
/// root key (and its public half) and a root-certified online signing key
/// (key id 1, version 1). Refuses to overwrite an existing master secret.
/// Returns the paths written.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, KeysError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let master = dir.join(files::MASTER);
    if master.exists() {
        return Err(KeysError::Usage(format!(
            "{} exists; refusing to replace a master secret",
            master.display()
        )));
    }
    write_secret_hex(&master, &random::<32>()[..])?;
    write_secret_hex(&dir.join(files::STORAGE), &random::<16>()[..])?;
    let root_seed = random::<32>();
    write_secret_hex(&dir.join(files::ROOT), &root_seed[..])?;
    let root = SigningKey::from_seed(&root_seed);
    let mut pub_hex = hex::encode(root.verifying_key().to_bytes());
    pub_hex.push('\n');
    write_file(&dir.join(files::ROOT_PUB), pub_hex.as_bytes(), 0o644)?;
    new_signing_key(dir, &root, 1, 1)?;
    Ok([
        files::MASTER,
        files::STORAGE,
        files::ROOT,
        files::ROOT_PUB,
        files::SIGNING,
        files::SIGNING_CERT,
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect())
}

/// `dapgw keys rotate-signing-key --dir DIR [--root FILE]`: replaces the
/// online key with a fresh one certified under the same key id with the
/// next key version. Returns the new certificate's version.
pub fn rotate_signing_key(dir: &Path, root_file: Option<&Path>) -> Result<u32, KeysError> {
    let root_path = root_file.map_or_else(|| dir.join(files::ROOT), Path::to_path_buf);
    let root = load_signing_key(&root_path)?;
    let old = load_key_cert(&dir.join(files::SIGNING_CERT))?;
    let version = old
        .key_version
        .checked_add(1)
        .ok_or_else(|| KeysError::Usage("key version exhausted".into()))?;
    new_signing_key(dir, &root, old.key_id, version)?;
    Ok(version)
}

/// One entry of the registry import file written by [`members`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportMember {
    /// Member id.
    pub id: u64,
    /// Key version.
    pub kv: u32,
    /// Groups.
    pub groups: Vec<u32>,
}

/// The registry import file: `{"members": [{"id", "kv", "groups"}...]}`
/// (no key: derived members' keys come from MS).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportFile {
    /// The members.
    pub members: Vec<ImportMember>,
}

/// `dapgw keys members`: derives credentials of members `from..from+count`
/// (key version 1) in `groups` and writes the credential file (0600) to
/// `out` and the registry import file next to it (`<out>.import.json`).
/// Returns the import file's path.
pub fn members(
    master: &Path,
    root_pub: &Path,
    from: u64,
    count: u64,
    groups: &[u32],
    out: &Path,
) -> Result<PathBuf, KeysError> {
    if count == 0 || count > 10_000_000 {
        return Err(KeysError::Usage("--count must be 1..=10000000".into()));
    }
    if from.checked_add(count).is_none() {
        return Err(KeysError::Usage("--from + --count overflows u64".into()));
    }
    let deriver = MemberKeyDeriver::new(&load_master(master)?);
    let root_public_key = *read_hex::<32>(root_pub)?;
    let creds = (from..from + count)
        .map(|id| MemberCredential {
            id,
            kv: 1,
            key: deriver.member_key(id, 1),
            groups: groups.to_vec(),
            root_public_key,
        })
        .collect::<Vec<_>>();
    let file = CredentialFile::new(creds);
    let json = Zeroizing::new(
        serde_json::to_vec_pretty(&file).map_err(|e| KeysError::Usage(e.to_string()))?,
    );
    write_file(out, &json, 0o600)?;
    let import = ImportFile {
        members: (from..from + count)
            .map(|id| ImportMember {
                id,
                kv: 1,
                groups: groups.to_vec(),
            })
            .collect(),
    };
    let mut import_path = out.as_os_str().to_owned();
    import_path.push(".import.json");
    let import_path = PathBuf::from(import_path);
    let json = serde_json::to_vec_pretty(&import).map_err(|e| KeysError::Usage(e.to_string()))?;
    write_file(&import_path, &json, 0o644)?;
    Ok(import_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys::verify_key_certificate;
    use crate::protocol::suite::VerifyingKey;

    #[test]
    fn init_rotate_members_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let written = init(dir.path()).unwrap();
        assert_eq!(written.len(), 6);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [files::MASTER, files::STORAGE, files::ROOT, files::SIGNING] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        // A second init refuses to replace the master secret.
        assert!(matches!(init(dir.path()), Err(KeysError::Usage(_))));
        let root_pub =
            VerifyingKey::from_bytes(&read_hex::<32>(&dir.path().join(files::ROOT_PUB)).unwrap())
                .unwrap();
        let cert = load_key_cert(&dir.path().join(files::SIGNING_CERT)).unwrap();
        let online = load_signing_key(&dir.path().join(files::SIGNING)).unwrap();
        assert_eq!(cert.public_key, online.verifying_key().to_bytes());
        verify_key_certificate(
            &root_pub,
            cert.key_id,
            cert.key_version,
            &cert.public_key,
            &cert.root_sig,
        )
        .unwrap();
        assert_eq!(rotate_signing_key(dir.path(), None).unwrap(), 2);
        let cert2 = load_key_cert(&dir.path().join(files::SIGNING_CERT)).unwrap();
        assert_ne!(cert2.public_key, cert.public_key);
        verify_key_certificate(
            &root_pub,
            cert2.key_id,
            2,
            &cert2.public_key,
            &cert2.root_sig,
        )
        .unwrap();

        let out = dir.path().join("creds.json");
        let import = members(
            &dir.path().join(files::MASTER),
            &dir.path().join(files::ROOT_PUB),
            100,
            3,
            &[7, 8],
            &out,
        )
        .unwrap();
        let creds: CredentialFile = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let d = MemberKeyDeriver::new(&load_master(&dir.path().join(files::MASTER)).unwrap());
        assert_eq!(creds.members.len(), 3);
        assert_eq!(creds.members[1].id, 101);
        assert_eq!(creds.members[1].key.expose(), d.member_key(101, 1).expose());
        let imp: ImportFile = serde_json::from_slice(&std::fs::read(&import).unwrap()).unwrap();
        assert_eq!(
            imp.members[2],
            ImportMember {
                id: 102,
                kv: 1,
                groups: vec![7, 8]
            }
        );
    }
}
