//! `cargo xtask image`: the VM image, a qcow2 made only of Debian's packages
//! and our own .deb, with no loop device and no mount outside a private
//! mount namespace: mmdebstrap makes the root (cached as a tar under
//! [`CACHE`]), images/image/customize.sh finishes it in a chroot, `mkfs.ext4
//! -d` and mtools write its file systems, and systemd-boot starts it on UEFI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::{deb, root, run, setup};

/// Where the base tar is kept between builds (outside the repository).
pub const CACHE: &str = "/var/cache/portcullis/image";
const SUITE: &str = "bookworm";
const ESP_MIB: u64 = 96;
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The kernel command line: root by label, the NIC named eth0, the serial console.
const CMDLINE: &str = "root=LABEL=portcullis-root ro net.ifnames=0 console=ttyS0,115200 quiet";

/// The packages the image build and the VM test use.
pub const PACKAGES: &[&str] = &[
    "mmdebstrap",
    "e2fsprogs",
    "dosfstools",
    "mtools",
    "fdisk",
    "qemu-utils",
    "qemu-system-x86",
    "ovmf",
    "systemd-boot-efi",
    "openssh-client",
];

/// What one build made.
#[derive(Debug)]
pub struct Image {
    /// `target/image/portcullis_<version>.qcow2`.
    pub qcow2: PathBuf,
    /// The package installed in it.
    pub deb: PathBuf,
}

/// Builds the package (unless given) and the image around it.
pub fn build(deb: Option<PathBuf>) -> anyhow::Result<Image> {
    crate::require_root("cargo xtask image")?;
    setup::apt_install(PACKAGES)?;
    let deb = match deb {
        Some(deb) => deb,
        None => deb::build(None)?.deb,
    };
    let started = Instant::now();
    let work = root().join("target/image");
    let rootfs = work.join("root");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    std::fs::create_dir_all(&rootfs)?;
    let base = base()?;
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpf"])
        .arg(&base)
        .arg("-C")
        .arg(&rootfs))?;
    customize(&rootfs, &deb)?;
    let boot = boot_files(&rootfs)?;
    let raw = work.join("disk.raw");
    assemble(&rootfs, &boot, &raw, &work)?;
    let version = deb_version(&deb)?;
    let qcow2 = work.join(format!("portcullis_{version}.qcow2"));
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&rootfs)?;
    println!(
        "xtask: {} ({} MiB; disk {} MiB) built in {:.0} s",
        qcow2.display(),
        std::fs::metadata(&qcow2)?.len() >> 20,
        virtual_mib(&qcow2)?,
        started.elapsed().as_secs_f64()
    );
    Ok(Image { qcow2, deb })
}

/// The base (mmdebstrap, minbase) for the package list, made once and kept as a tar under [`CACHE`].
fn base() -> anyhow::Result<PathBuf> {
    let list = root().join("images/image/packages");
    let text = std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    let packages: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let key = fnv(&format!("{SUITE} {}", packages.join(",")));
    let cache = PathBuf::from(CACHE);
    let tar = cache.join(format!("base-{SUITE}-{key:016x}.tar"));
    if tar.exists() {
        println!("xtask: the image base is cached at {}", tar.display());
        return Ok(tar);
    }
    std::fs::create_dir_all(&cache)?;
    println!("xtask: mmdebstrap {SUITE} into {} (minutes, once)", tar.display());
    let partial = tar.with_extension("partial");
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--format=tar",
            &format!("--include={}", packages.join(",")),
        ])
        .arg(SUITE)
        .arg(&partial)
        .arg(mirror()))?;
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// The Debian mirror this machine's apt uses.
fn mirror() -> String {
    std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("URIs:").map(|u| u.trim().to_owned()))
        })
        .filter(|u| !u.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs customize.sh in the root, inside a private mount namespace so that
/// /proc, /sys and /dev go away with it, whatever happens.
fn customize(rootfs: &Path, deb: &Path) -> anyhow::Result<()> {
    let stage = rootfs.join("tmp/image");
    std::fs::create_dir_all(&stage)?;
    let image_dir = root().join("images/image");
    for file in ["customize.sh", "portcullis-seed", "portcullis-seed.service"] {
        std::fs::copy(image_dir.join(file), stage.join(file))?;
    }
    let name = deb.file_name().context("the package has a file name")?;
    std::fs::copy(deb, stage.join(name))?;
    let script = format!(
        "set -e; r={root}; mount -t proc proc $r/proc; mount -t sysfs sys $r/sys; \
         mount --rbind /dev $r/dev; cp /etc/resolv.conf $r/etc/resolv.conf; \
         chroot $r /bin/sh /tmp/image/customize.sh /tmp/image/{deb}",
        root = rootfs.display(),
        deb = name.to_string_lossy()
    );
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(script))
}

struct Boot {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn boot_files(rootfs: &Path) -> anyhow::Result<Boot> {
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(&boot)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    Ok(Boot {
        kernel: find("vmlinuz-")?,
        initrd: find("initrd.img-")?,
    })
}

/// Writes a GPT disk: an EFI system partition with systemd-boot, the kernel
/// and the initramfs, then the ext4 root made from `rootfs`.
fn assemble(rootfs: &Path, boot: &Boot, raw: &Path, work: &Path) -> anyhow::Result<()> {
    let used = du_mib(rootfs)?;
    let root_mib = used + used / 2 + 256;
    let root_img = work.join("root.ext4");
    let esp_img = work.join("esp.vfat");
    for file in [&root_img, &esp_img, &raw.to_path_buf()] {
        if file.exists() {
            std::fs::remove_file(file)?;
        }
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "portcullis-root", "-d"])
        .arg(rootfs)
        .arg(&root_img)
        .arg(format!("{root_mib}M")))?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-C"])
        .arg(&esp_img)
        .arg((ESP_MIB * 1024).to_string()))?;
    let loader = work.join("loader");
    std::fs::create_dir_all(loader.join("entries"))?;
    std::fs::write(loader.join("loader.conf"), "default portcullis.conf\ntimeout 0\n")?;
    std::fs::write(
        loader.join("entries/portcullis.conf"),
        format!("title Portcullis\nlinux /vmlinuz\ninitrd /initrd.img\noptions {CMDLINE}\n"),
    )?;
    let esp = esp_img.to_string_lossy().into_owned();
    run(Command::new("mmd").args(["-i", &esp, "::/EFI", "::/EFI/BOOT"]))?;
    run(Command::new("mcopy").args(["-i", &esp, SYSTEMD_BOOT, "::/EFI/BOOT/BOOTX64.EFI"]))?;
    run(Command::new("mcopy")
        .args(["-i", &esp, "-s"])
        .arg(&loader)
        .arg("::/"))?;
    run(Command::new("mcopy")
        .args(["-i", &esp])
        .arg(&boot.kernel)
        .arg("::/vmlinuz"))?;
    run(Command::new("mcopy")
        .args(["-i", &esp])
        .arg(&boot.initrd)
        .arg("::/initrd.img"))?;
    std::fs::remove_dir_all(&loader)?;

    let total_mib = 1 + ESP_MIB + root_mib + 1;
    let file = std::fs::File::create(raw)?;
    file.set_len(total_mib << 20)?;
    drop(file);
    let layout = format!(
        "label: gpt\nstart=1MiB, size={ESP_MIB}MiB, type=U, name=esp\nsize={root_mib}MiB, type=L, name=root\n"
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw);
    pipe(&mut sfdisk, &layout)?;
    for (image, offset_mib) in [(&esp_img, 1), (&root_img, 1 + ESP_MIB)] {
        run(Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", raw.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={offset_mib}")))?;
        std::fs::remove_file(image)?;
    }
    Ok(())
}

fn pipe(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    println!("xtask: $ {} <<< {input:?}", crate::show(cmd));
    let mut child = cmd.stdin(std::process::Stdio::piped()).spawn()?;
    child
        .stdin
        .take()
        .context("piped stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed with {status}", crate::show(cmd));
    }
    Ok(())
}

fn du_mib(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sm"]).arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sm {} printed no size", dir.display()))
}

fn virtual_mib(qcow2: &Path) -> anyhow::Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(qcow2)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"virtual-size\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|bytes| bytes >> 20)
        .with_context(|| format!("qemu-img info {} printed no virtual size", qcow2.display()))
}

/// The version in a package's file name, `portcullis_<version>_amd64.deb`.
pub fn deb_version(deb: &Path) -> anyhow::Result<String> {
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_prefix("portcullis_")
        .and_then(|r| r.strip_suffix("_amd64.deb"))
        .map(str::to_owned)
        .with_context(|| format!("{} is not named portcullis_<version>_amd64.deb", deb.display()))
}
