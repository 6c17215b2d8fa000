//! `dapgw keys`: the key material a UDC deployment needs, and the loaders
//! the UDC uses to read it back at start.
//!
//! ```text
//! keys init --> master.key, storage.key, root.key (offline), root.pub,
//!               signing.key (online), signing.cert (root-signed KeyCertificate)
//! keys rotate-signing-key --> signing.key, signing.cert (key_version + 1)
//! keys members --> credentials JSON (factory) + registry import JSON (UDC)
//! keys import-vendor --> registry import JSON with sealed imported keys (UDC)
//!                        [+ credentials JSON for simulated meters]
//! ```
//!
//! Every file holds lowercase hex and a newline (the certificate: the hex of
//! the complete 106-byte KeyCertificate message). Secrets are written with
//! mode 0600, never printed, and zeroized after use.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use zeroize::Zeroizing;

use super::service::member_aad;
use crate::protocol::keys::{
    CredentialFile, MasterSecret, MemberCredential, MemberKey, MemberKeyDeriver, StorageKey,
    import_member_key, sign_key_certificate,
};
use crate::protocol::suite::{Key16, SigningKey};
use crate::protocol::verifier::KeySource;
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
    /// A line of a text file does not hold what it should (its content is
    /// never quoted: it may hold a key).
    #[error("{path} line {line}: {what}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
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

/// One entry of the registry import file written by [`members`] or
/// [`import_vendor`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportMember {
    /// Member id.
    pub id: u64,
    /// Key version.
    pub kv: u32,
    /// Groups.
    pub groups: Vec<u32>,
    /// For a vendor-imported member: hex of its key `K_i(kv)`, sealed under
    /// the UDC's storage key with the member's row identity (the form the
    /// store keeps). Absent for members whose keys derive from MS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<String>,
}

/// The registry import file: `{"members": [{"id", "kv", "groups"
/// [, "sealed_key"]}...]}` (derived members carry no key: theirs come from
/// MS; imported members carry theirs sealed, never in the clear).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportFile {
    /// The members.
    pub members: Vec<ImportMember>,
}

/// `dapgw keys members`: derives credentials of members `from..from+count`
/// (key version 1) in `groups` from the key directory `keys` and writes the
/// credential file (0600) to `out` and the registry import file next to it
/// (`<out>.import.json`). Returns the import file's path. The credentials'
/// `min_online_key_version` is the version of the online key certified in
/// `keys` now.
pub fn members(
    keys: &Path,
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
    let deriver = MemberKeyDeriver::new(&load_master(&keys.join(files::MASTER))?);
    let root_public_key = *read_hex::<32>(&keys.join(files::ROOT_PUB))?;
    let min_online_key_version = load_key_cert(&keys.join(files::SIGNING_CERT))?.key_version;
    let creds = (from..from + count)
        .map(|id| MemberCredential {
            id,
            kv: 1,
            key: deriver.member_key(id, 1),
            groups: groups.to_vec(),
            root_public_key,
            min_online_key_version,
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
                sealed_key: None,
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

/// Key lengths a vendor key file may hold, in bytes (128 to 512 bits).
pub const VENDOR_KEY_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Most members one vendor key file may hold.
pub const VENDOR_FILE_MAX_MEMBERS: usize = 10_000_000;

/// A meter vendor's per-meter key, as read from a vendor key file. Never
/// used as a dapgw key itself: [`import_member_key`] turns it into `K_i`.
/// Zeroized on drop; `Debug` shows the id only.
pub struct VendorKey {
    /// The member (meter) id.
    pub id: u64,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for VendorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl VendorKey {
    /// The member key `K_i(kv)` this vendor key imports as.
    pub fn member_key(&self, kv: u32) -> MemberKey {
        import_member_key(&self.key, self.id, kv)
    }
}

/// Reads a vendor key file: one `id,key` per line, the id in decimal and
/// the key in hex (16 to 64 bytes); blank lines, lines starting with `#`
/// and a first line `id,key` are skipped. Ids must be unique. Errors name
/// the line, never its content.
pub fn read_vendor_keys(path: &Path) -> Result<Vec<VendorKey>, KeysError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    let bad = |line: usize, what: &'static str| KeysError::Line {
        path: path.to_path_buf(),
        line,
        what,
    };
    let mut keys = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || (i == 0 && line == "id,key") {
            continue;
        }
        let Some((id, key)) = line.split_once(',') else {
            return Err(bad(i + 1, "expected `id,key`"));
        };
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| bad(i + 1, "the id is not a decimal u64"))?;
        let key =
            Zeroizing::new(hex::decode(key.trim()).map_err(|_| bad(i + 1, "the key is not hex"))?);
        if !VENDOR_KEY_BYTES.contains(&key.len()) {
            return Err(bad(i + 1, "the key must be 16 to 64 bytes"));
        }
        if !seen.insert(id) {
            return Err(bad(i + 1, "the id appears twice"));
        }
        if keys.len() == VENDOR_FILE_MAX_MEMBERS {
            return Err(bad(i + 1, "more than 10,000,000 members"));
        }
        keys.push(VendorKey { id, key });
    }
    if keys.is_empty() {
        return Err(KeysError::Format {
            path: path.to_path_buf(),
            what: "no member keys",
        });
    }
    Ok(keys)
}

/// The sealed form of an imported key as the UDC's store keeps it: the
/// verifier's [`KeySource::Imported`] sealed under `storage` with the
/// member's row identity.
fn seal_imported(
    storage: &StorageKey,
    id: u64,
    kv: u32,
    key: MemberKey,
) -> Result<Vec<u8>, KeysError> {
    let source = KeySource::Imported { kv, key };
    let plain =
        Zeroizing::new(serde_json::to_vec(&source).map_err(|e| KeysError::Usage(e.to_string()))?);
    Ok(storage.seal_row(
        &mut rand_core::UnwrapErr(getrandom::SysRng),
        &member_aad(id),
        &plain,
    ))
}

/// What [`import_vendor`] wrote.
#[derive(Debug)]
pub struct VendorImport {
    /// How many members the files hold.
    pub members: usize,
    /// The registry import file (0600).
    pub import: PathBuf,
    /// The member credential file, if asked for (0600).
    pub credentials: Option<PathBuf>,
}

/// `dapgw keys import-vendor`: turns a meter vendor's key file into the
/// UDC's registry import file `out` (0600), each member's key version `kv`
/// key `K_i = import_member_key(vendor_key, id, kv)` sealed under the
/// storage key of `keys_dir`, so the file and the operator API that loads
/// it never carry a key in the clear. With `credentials`, also writes the
/// member credential file (0600) that meters computing `K_i` from their
/// vendor key hold (for simulated meters and tests; a real meter derives
/// `K_i` in its firmware, and that file should not exist).
pub fn import_vendor(
    keys_dir: &Path,
    vendor: &Path,
    groups: &[u32],
    kv: u32,
    out: &Path,
    credentials: Option<&Path>,
) -> Result<VendorImport, KeysError> {
    if groups.is_empty() {
        return Err(KeysError::Usage(
            "--groups must name at least one group".into(),
        ));
    }
    if kv == 0 {
        return Err(KeysError::Usage("--kv must be at least 1".into()));
    }
    let storage = load_storage_key(&keys_dir.join(files::STORAGE))?;
    let vendor_keys = read_vendor_keys(vendor)?;
    let members = vendor_keys
        .iter()
        .map(|v| {
            Ok(ImportMember {
                id: v.id,
                kv,
                groups: groups.to_vec(),
                sealed_key: Some(hex::encode(seal_imported(
                    &storage,
                    v.id,
                    kv,
                    v.member_key(kv),
                )?)),
            })
        })
        .collect::<Result<Vec<_>, KeysError>>()?;
    let json = serde_json::to_vec_pretty(&ImportFile { members })
        .map_err(|e| KeysError::Usage(e.to_string()))?;
    write_file(out, &json, 0o600)?;
    let credentials = match credentials {
        Some(path) => {
            let root_public_key = *read_hex::<32>(&keys_dir.join(files::ROOT_PUB))?;
            let min_online_key_version =
                load_key_cert(&keys_dir.join(files::SIGNING_CERT))?.key_version;
            let creds = vendor_keys
                .iter()
                .map(|v| MemberCredential {
                    id: v.id,
                    kv,
                    key: v.member_key(kv),
                    groups: groups.to_vec(),
                    root_public_key,
                    min_online_key_version,
                })
                .collect();
            let json = Zeroizing::new(
                serde_json::to_vec_pretty(&CredentialFile::new(creds))
                    .map_err(|e| KeysError::Usage(e.to_string()))?,
            );
            write_file(path, &json, 0o600)?;
            Some(path.to_path_buf())
        }
        None => None,
    };
    Ok(VendorImport {
        members: vendor_keys.len(),
        import: out.to_path_buf(),
        credentials,
    })
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
        let import = members(dir.path(), 100, 3, &[7, 8], &out).unwrap();
        let creds: CredentialFile = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let d = MemberKeyDeriver::new(&load_master(&dir.path().join(files::MASTER)).unwrap());
        assert_eq!(creds.members.len(), 3);
        assert_eq!(creds.members[1].id, 101);
        assert_eq!(creds.members[1].key.expose(), d.member_key(101, 1).expose());
        // Written after the rotation: version 1 is no longer trusted.
        assert!(creds.members.iter().all(|c| c.min_online_key_version == 2));
        let imp: ImportFile = serde_json::from_slice(&std::fs::read(&import).unwrap()).unwrap();
        assert_eq!(
            imp.members[2],
            ImportMember {
                id: 102,
                kv: 1,
                groups: vec![7, 8],
                sealed_key: None,
            }
        );
    }

    fn vendor_file(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("vendor.csv");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn vendor_key_file_is_read_strictly_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let k16 = "a1".repeat(16);
        let k64 = "b2".repeat(64);
        let ok = vendor_file(
            dir.path(),
            &format!("id,key\n# comment\n\n5,{k16}\n 6 , {k64} \n"),
        );
        let keys = read_vendor_keys(&ok).unwrap();
        assert_eq!(keys.iter().map(|k| k.id).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(
            keys[0].member_key(1).expose(),
            import_member_key(&[0xa1; 16], 5, 1).expose()
        );
        let shown = format!("{keys:?}");
        assert!(
            shown.contains("redacted") && !shown.contains("a1a1"),
            "{shown}"
        );

        let secret = "c3".repeat(15);
        for (text, line, what) in [
            (format!("1,{k16}\n2;{secret}\n"), 2, "expected `id,key`"),
            (format!("x,{k16}\n"), 1, "the id is not a decimal u64"),
            (format!("1,{secret}zz\n"), 1, "the key is not hex"),
            (format!("1,{secret}\n"), 1, "the key must be 16 to 64 bytes"),
            (format!("1,{k64}c3\n"), 1, "the key must be 16 to 64 bytes"),
            (format!("1,{k16}\n1,{k64}\n"), 2, "the id appears twice"),
        ] {
            let err = read_vendor_keys(&vendor_file(dir.path(), &text)).unwrap_err();
            assert!(
                matches!(&err, KeysError::Line { line: l, what: w, .. } if *l == line && *w == what),
                "{text}: {err}"
            );
            let msg = err.to_string();
            assert!(!msg.contains("c3c3") && !msg.contains("a1a1"), "{msg}");
        }
        let empty = read_vendor_keys(&vendor_file(dir.path(), "id,key\n# none\n"));
        assert!(matches!(empty, Err(KeysError::Format { .. })));
    }

    #[test]
    fn vendor_import_seals_keys_the_udc_can_open() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let vendor = vendor_file(
            dir.path(),
            &format!("7,{}\n8,{}\n", "11".repeat(16), "22".repeat(32)),
        );
        let out = dir.path().join("import.json");
        let creds_path = dir.path().join("creds.json");
        let done = import_vendor(dir.path(), &vendor, &[3, 4], 2, &out, Some(&creds_path)).unwrap();
        assert_eq!(done.members, 2);
        #[cfg(unix)]
        for f in [&out, &creds_path] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let text = std::fs::read_to_string(&out).unwrap();
        let expected = import_member_key(&[0x22; 32], 8, 2);
        assert!(!text.contains(&hex::encode(expected.expose())));
        assert!(!text.contains(&"22".repeat(32)));

        let storage = load_storage_key(&dir.path().join(files::STORAGE)).unwrap();
        let file: ImportFile = serde_json::from_str(&text).unwrap();
        assert_eq!(file.members.len(), 2);
        let m = &file.members[1];
        assert_eq!((m.id, m.kv, m.groups.as_slice()), (8, 2, &[3, 4][..]));
        let sealed = hex::decode(m.sealed_key.as_ref().unwrap()).unwrap();
        let plain = storage.open_row(&member_aad(8), &sealed).unwrap();
        // The form docs/protocol.md ("Registry import file") gives.
        assert!(plain.starts_with(br#"{"Imported":{"kv":2,"key":["#));
        assert_eq!(&member_aad(8)[..], b"members\0\0\0\0\0\0\0\0\x08");
        let source: KeySource = serde_json::from_slice(&plain).unwrap();
        assert_eq!(
            source,
            KeySource::Imported {
                kv: 2,
                key: expected.clone()
            }
        );
        // Sealed under member 8's identity: it does not open as member 7's.
        assert!(storage.open_row(&member_aad(7), &sealed).is_err());

        let creds: CredentialFile =
            serde_json::from_slice(&std::fs::read(&creds_path).unwrap()).unwrap();
        assert_eq!(creds.members[1].key.expose(), expected.expose());
        assert_eq!(creds.members[1].kv, 2);

        assert!(matches!(
            import_vendor(dir.path(), &vendor, &[], 1, &out, None),
            Err(KeysError::Usage(_))
        ));
        assert!(matches!(
            import_vendor(dir.path(), &vendor, &[3], 0, &out, None),
            Err(KeysError::Usage(_))
        ));
    }
}
