import ConcordCore
import Testing

@Suite struct SubscriberReportTests {
    @Test func reportsRoundTrip() throws {
        let report = SubscriberReport(
            name: "billing@host:replica.sqlite", activity: "following", position: 42, verifiedLSN: 40, repairs: 2,
            repairedRecords: 7, mismatches: 3)
        #expect(try SubscriberReport.decode(report.encoded()) == report)
    }

    @Test(arguments: [
        #"{"name":"a b","activity":"following","position":1}"#,
        #"{"name":"","activity":"following","position":1}"#,
        #"{"name":"<x>","activity":"following","position":1}"#,
        #"{"name":"x\"y","activity":"following","position":1}"#,
        #"{"name":"x","activity":"Following!","position":1}"#,
        #"{"name":"x","activity":"following","position":-1}"#,
        #"{"name":"x","activity":"following","position":1,"verified":2}"#,
        #"{"name":"x","activity":"following","position":1,"repairs":1e3}"#,
        #"{"name":"x","activity":"following","position":1,"repairs":99999999999999999999}"#,
        #"{"name":"x","activity":"following""#,
    ])
    func badReportsAreRefused(_ text: String) {
        #expect(throws: ConcordError.self) { try SubscriberReport.decode(Array(text.utf8)) }
    }

    @Test func namesAreBounded() {
        #expect(throws: ConcordError.self) {
            try SubscriberReport.validate(name: String(repeating: "n", count: SubscriberReport.maxNameBytes + 1))
        }
        #expect(throws: Never.self) { try SubscriberReport.validate(name: "shipping-7") }
    }

    @Test func dashboardCredentialsTakeBearerOrBasic() throws {
        let policy = try AccessPolicy.parse("ops admin * dashboard-secret-0123", origin: "test")
        // base64("anyone:dashboard-secret-0123")
        let basic = "Basic YW55b25lOmRhc2hib2FyZC1zZWNyZXQtMDEyMw=="
        #expect(try policy.authenticate(dashboardCredentials: basic).name == "ops")
        #expect(try policy.authenticate(dashboardCredentials: "Bearer dashboard-secret-0123").name == "ops")
        for bad in ["Basic %%%", "Basic YW55b25l", "Basic YW55b25lOndyb25n", "Basic ", nil] {
            #expect(throws: ConcordError.self, "\(bad ?? "nil")") {
                try policy.authenticate(dashboardCredentials: bad)
            }
        }
    }
}
