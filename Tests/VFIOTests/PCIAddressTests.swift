import Testing
import VFIO

@Suite struct PCIAddressTests {
    @Test func parsesAndPrintsSysfsSpelling() {
        #expect(PCIAddress("0000:00:03.0")?.description == "0000:00:03.0")
        #expect(PCIAddress("01:1f.7") == PCIAddress(domain: 0, bus: 1, device: 0x1f, function: 7))
        for bad in ["", "00:03", "0000:00:20.0", "0000:00:03.8", "000:00:03.0", "0000:00:03.0.1", "zz:00.0"] {
            #expect(PCIAddress(bad) == nil, "\(bad)")
        }
    }
}
