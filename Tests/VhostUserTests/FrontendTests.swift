import Testing
import VhostUser

@Test func placeholder() {}
