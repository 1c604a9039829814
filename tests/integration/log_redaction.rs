//! Checks that the test-support capture works from outside the crate, in a
//! fresh process where nothing installed the `log` bridge beforehand.

use wa_pair::phone::PhoneNumber;
use wa_pair::telemetry::capture_subscriber;

#[test]
fn a_pairing_flow_logs_neither_the_code_nor_the_full_phone_number() {
    // Arrange
    let phone = PhoneNumber::parse("14155552671").expect("valid");
    let (subscriber, logs) = capture_subscriber();

    // Act
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("pair_session", phone = %phone);
        let _entered = span.enter();
        log::info!(target: "Client/PairCode", "secret for {}: WXYZ9876", phone.as_str());
        tracing::info!(?phone, "pairing issued");
    });
    let output = logs.contents();

    // Assert
    assert!(output.contains("pairing issued"), "{output}");
    assert!(
        output.contains("1415****2671") || output.contains("141****671"),
        "{output}"
    );
    assert!(!output.contains("WXYZ9876"), "{output}");
    assert!(!output.contains("14155552671"), "{output}");
}
