import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The guest lane itself (scripts/guest-lane.sh), checked from inside the guest: what the
/// VFIO tests and the benchmark rely on. One boot for all of it (TCG boots are slow), and
/// the suite is serialized so that its boots never run side by side.
///
/// OUTBOARD_SKIP_GUEST_LANE=1 skips it (the static build and a boot take a few minutes on
/// a busy 2-core machine); CI runs it.
@Suite(.serialized, .disabled(if: getenv("OUTBOARD_SKIP_GUEST_LANE") != nil, "OUTBOARD_SKIP_GUEST_LANE is set"))
struct GuestLaneTests {
    /// Two virtio-blk devices at the documented addresses, each alone in its IOMMU group,
    /// bound to the guest kernel's virtio-pci at boot; VFIO ready; the driver sandbox works
    /// in the static binary (users resolved by name, every forbidden attempt refused); and
    /// the lane gives back a command's exact output and status.
    @Test func theGuestHasTheDocumentedDisksVFIOAndAWorkingSandbox() throws {
        let run = try GuestLane.run(checks: [
            ("disks", """
                for d in /sys/bus/pci/devices/*; do
                  if [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1042 ]; then
                    echo "$(basename $d) serial=$(cat $d/virtio*/block/*/serial) driver=$(basename $(readlink $d/driver)) \
                group-members=$(ls $d/iommu_group/devices | tr '\\n' ,)"
                    echo "group $(basename $(readlink $d/iommu_group))"
                  fi
                done
                """),
            ("vfio", "modprobe vfio-pci && ls /dev/vfio && [ -c /dev/vfio/vfio ] && echo vfio-is-a-character-device"),
            ("probe-nobody", "outboard _sandbox-probe --user nobody"),
            ("probe-driver", "outboard _sandbox-probe --user outboard-driver"),
            ("exact-output", "printf 'two lines\\nno newline'; exit 7"),
        ], includingFio: false)

        let disks = try #require(run["disks"], "\(run)")
        let (o, k) = (GuestLane.outboardDisk, GuestLane.kernelDisk)
        let deviceLines = disks.lines.filter { !$0.hasPrefix("group ") && !$0.isEmpty }
        #expect(deviceLines == [
            "\(o.address) serial=\(o.serial) driver=virtio-pci group-members=\(o.address),",
            "\(k.address) serial=\(k.serial) driver=virtio-pci group-members=\(k.address),",
        ], "\(disks)")
        let groups = disks.lines.filter { $0.hasPrefix("group ") }
        #expect(groups.count == 2 && Set(groups).count == 2, "each disk in its own IOMMU group: \(disks)")

        let vfio = try #require(run["vfio"], "\(run)")
        #expect(vfio.status == 0, "\(vfio)")
        // The container device, and no group yet: binding a disk to vfio-pci is the manager's job.
        #expect(vfio.lines == ["vfio", "vfio-is-a-character-device", ""], "\(vfio)")

        for (name, id) in [("probe-nobody", 65534), ("probe-driver", 999)] {
            let probe = try #require(run[name], "\(run)")
            #expect(probe.status == 0, "\(probe)")
            let lines = probe.lines.filter { !$0.isEmpty }
            #expect(lines.first == "sandbox entered namespaces true", "\(probe)")
            #expect(lines.contains("uid \(id) gid \(id) euid \(id) egid \(id)"), "user resolved by name: \(probe)")
            let attempts = lines.filter { $0.hasPrefix("probe ") }
            #expect(attempts.count >= 20, "\(probe)")
            for a in attempts {
                let f = a.split(separator: " ")
                #expect(f.count == 6 && f[2] == "errno" && f[3] == "\(EPERM)" && f[5] == "true", "must be refused with EPERM: \(a)")
            }
            #expect(lines.contains("kill-self ok") && lines.contains("mmap ok"), "\(probe)")
            #expect(lines.contains("passwd-visible false errno \(ENOENT)"), "the empty root: \(probe)")
            #expect(lines.last == "done", "\(probe)")
        }

        let exact = try #require(run["exact-output"], "\(run)")
        #expect(exact.output == "two lines\nno newline" && exact.status == 7, "\(exact)")
        #expect(run.run.status == 7, "the run's status is the last check's: \(run)")
        #expect(run.checks.map(\.name) == ["disks", "vfio", "probe-nobody", "probe-driver", "exact-output"], "\(run)")
    }
}
