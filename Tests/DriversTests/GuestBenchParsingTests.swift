import OutboardBench
import Testing

/// The parsers `bench guest` reads the guest with: /proc/stat, /proc/PID/stat,
/// /sys/block/NAME/stat, /proc/interrupts and fio's JSON report, on text as those files
/// hold it (taken from the guest lane's 6.1 kernel and fio 3.33), and on text they never
/// hold.
@Suite struct GuestBenchParsingTests {
    @Test func procStatAggregateLine() throws {
        let text = Array("""
            cpu  265 3 218 805 7 11 13 2 0 0
            cpu0 130 1 100 400 3 5 6 1 0 0
            intr 12345 0 9
            """.utf8)
        let t = try CPUTimes.parse(procStat: text)
        #expect(t == { var c = CPUTimes(); c.user = 265; c.nice = 3; c.system = 218; c.idle = 805; c.iowait = 7; c.irq = 11; c.softirq = 13; c.steal = 2; return c }())
        #expect(t.total == 265 + 3 + 218 + 805 + 7 + 11 + 13 + 2)
        #expect(t.busy == 265 + 3 + 218 + 11 + 13 + 2, "idle and iowait are not busy")
    }

    @Test func procStatDeltaAndShortLines() throws {
        let a = try CPUTimes.parse(procStat: Array("cpu  10 0 20 100\n".utf8))
        #expect(a.iowait == 0 && a.irq == 0 && a.steal == 0, "fields a kernel does not print are 0")
        let b = try CPUTimes.parse(procStat: Array("cpu  15 0 22 190 1 0 0 0 0 0\n".utf8))
        let d = a.delta(to: b)
        #expect(d.user == 5 && d.system == 2 && d.idle == 90 && d.iowait == 1 && d.busy == 7 && d.total == 98)
        #expect(b.delta(to: a).total == 0, "a counter that went backwards counts 0, never wraps")
    }

    @Test func procStatRefusesWhatIsNotIt() {
        for bad in ["", "cpu0 1 2 3 4\n", "cpu  1 2 3\n", "cpu  1 two 3 4\n", "intr 1 2 3 4\ncpu  1 2 3 4\n", "cpu  -1 2 3 4\n"] {
            #expect(throws: LabError.self, "\(bad.debugDescription)") { try CPUTimes.parse(procStat: Array(bad.utf8)) }
        }
    }

    @Test func procPidStatTimesAfterAnAwkwardCommandName() throws {
        // The command name may hold spaces and parentheses: fields count from the last ")".
        let line = "4242 (fio (x) y) S 1 4242 4242 0 -1 4194560 1536 0 0 0 777 333 0 0 20 0 3 0 400 700000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n"
        let t = try ProcessTimes.parse(procPidStat: Array(line.utf8))
        #expect(t == ProcessTimes(user: 777, system: 333))
        #expect(t.delta(to: ProcessTimes(user: 800, system: 330)) == ProcessTimes(user: 23, system: 0))
    }

    @Test func procPidStatRefusesTruncatedLines() {
        for bad in ["", "4242 fio S 1 2 3", "4242 (fio) S 1 4242 4242 0 -1 4194560 1536 0 0 0 777", "4242 (fio) S 1 4242 4242 0 -1 4194560 1536 0 0 0 x 333 0"] {
            #expect(throws: LabError.self, "\(bad)") { try ProcessTimes.parse(procPidStat: Array(bad.utf8)) }
        }
    }

    @Test func sysBlockStatCounters() throws {
        let text = "    4210        0    33680     1862     9012        0    72096     5310        0     6228     7172        0        0        0        0        0        0\n"
        #expect(try DiskCounters.parse(sysBlockStat: Array(text.utf8)) == DiskCounters(readsCompleted: 4210, writesCompleted: 9012))
        #expect(throws: LabError.self) { try DiskCounters.parse(sysBlockStat: Array("1 2 3\n".utf8)) }
        #expect(throws: LabError.self) { try DiskCounters.parse(sysBlockStat: Array("1 2 3 4 five 6\n".utf8)) }
    }

    @Test func interruptsOfSomeVectors() {
        // As the guest lane's kernel shows them, with interrupt remapping (the chip column
        // gives no PCI address).
        let text = Array("""
                       CPU0       CPU1
              0:         85          0  IR-IO-APIC   2-edge      timer
             26:          0          0  IR-PCI-MSI 81920-edge      virtio1-config
             27:       1200         34  IR-PCI-MSI 81921-edge      virtio1-req.0
             30:          7          0  IR-PCI-MSI 81922-edge      virtio1-req.1
             31:         99          1  IR-PCI-MSIX-0000:00:04.0    1-edge      vfio-msix[1](0000:00:04.0)
            LOC:      55555      44444   Local timer interrupts
            ERR:          0
            """.utf8)
        #expect(InterruptCounts.parse(procInterrupts: text, irqs: [26, 27, 30]) == 1241)
        #expect(InterruptCounts.parse(procInterrupts: text, irqs: [31]) == 100)
        #expect(InterruptCounts.parse(procInterrupts: text, irqs: [5]) == 0)
        #expect(InterruptCounts.parse(procInterrupts: text, irqs: []) == 0)
        #expect(InterruptCounts.parse(procInterrupts: [], irqs: [27]) == 0)
        #expect(InterruptCounts.parse(procInterrupts: text, row: "LOC") == 99999)
        #expect(InterruptCounts.parse(procInterrupts: text, row: "ERR") == 0, "a row with fewer counts than CPUs is not read")
        #expect(InterruptCounts.parse(procInterrupts: text, row: "CAL") == 0)
    }

    /// A fio 3.33 report as `--output-format=json` writes it, cut to the fields read, with
    /// a warning line before it as fio prints some.
    func fioReport(readIos: Int = 0, writeIos: Int = 22500, error: Int = 0) -> [UInt8] {
        Array("""
            fio: some warning on stdout
            {
              "fio version" : "fio-3.33",
              "jobs" : [
                {
                  "jobname" : "guest",
                  "error" : \(error),
                  "read" : { "io_bytes" : 0, "iops" : \(readIos == 0 ? "0.000000" : "9001.5"), "runtime" : \(readIos == 0 ? 0 : 2500), "total_ios" : \(readIos),
                             "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0 } },
                  "write" : { "io_bytes" : 92160000, "iops" : 9000.25, "runtime" : 2500, "total_ios" : \(writeIos),
                              "clat_ns" : { "min" : 60000, "max" : 9000000, "mean" : 110000.0,
                                            "percentile" : { "1.000000" : 70000, "50.000000" : 101376, "99.000000" : 411648, "99.990000" : 8000000 } } },
                  "usr_cpu" : 3.25,
                  "sys_cpu" : 41.5
                }
              ]
            }
            """.utf8)
    }

    @Test func fioReportWriteSide() throws {
        let r = try FioJobReport.parse(fioReport(), write: true)
        #expect(r == FioJobReport(ios: 22500, iops: 9000.25, seconds: 2.5, clatP50Us: 101.376, clatP99Us: 411.648, usrCpuPct: 3.25, sysCpuPct: 41.5))
    }

    @Test func fioReportRefusals() {
        #expect(throws: LabError.self, "the read side did nothing") { try FioJobReport.parse(fioReport(), write: false) }
        #expect(throws: LabError.self, "a job error") { try FioJobReport.parse(fioReport(error: 5), write: true) }
        #expect(throws: LabError.self, "no JSON at all") { try FioJobReport.parse(Array("fio: engine io_uring not loadable\n".utf8), write: true) }
        #expect(throws: LabError.self, "no job") { try FioJobReport.parse(Array("{\"jobs\":[]}".utf8), write: true) }
        #expect(throws: LabError.self, "cut short") { try FioJobReport.parse(Array(fioReport().prefix(300)), write: true) }
    }

    @Test func fioReportReadSideWithoutPercentiles() throws {
        // A side without clat percentiles (fio --clat_percentiles=0) has latencies 0, not an error.
        let text = Array("""
            {"jobs":[{"error":0,"read":{"iops":100.0,"runtime":1000,"total_ios":100,"clat_ns":{"mean":1.0}},
                      "write":{"iops":0,"runtime":0,"total_ios":0},"usr_cpu":1.0,"sys_cpu":2.0}]}
            """.utf8)
        let r = try FioJobReport.parse(text, write: false)
        #expect(r.ios == 100 && r.seconds == 1 && r.clatP50Us == 0 && r.clatP99Us == 0)
    }
}
