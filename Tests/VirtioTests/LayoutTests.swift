import Testing
import Virtio

@Test func placeholder() {}
