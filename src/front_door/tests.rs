use super::*;

/// The login grace time ends a connection that never authenticates; once authenticated,
/// only a connection without an open channel for the unused-connection timeout ends.
#[tokio::test(start_paused = true)]
async fn connections_end_unauthenticated_or_unused_not_while_a_channel_is_open() {
    let (_authed_tx, authed_rx) = oneshot::channel::<()>();
    let (_active_tx, active_rx) = watch::channel(0usize);
    let started = tokio::time::Instant::now();
    let why = limits(authed_rx, active_rx).await;
    assert_eq!(started.elapsed(), LOGIN_GRACE_TIME);
    assert!(why.contains("login grace"), "{why}");

    let (authed_tx, authed_rx) = oneshot::channel::<()>();
    let active_tx = Arc::new(watch::channel(0usize).0);
    let active_rx = active_tx.subscribe();
    let _ = authed_tx.send(());
    let channel = Active::new(&active_tx);
    let limit = tokio::spawn(limits(authed_rx, active_rx));
    // Ten minutes with a channel open: still served.
    tokio::time::sleep(UNUSED_TIMEOUT * 10).await;
    assert!(!limit.is_finished());
    drop(channel);
    let closed_at = tokio::time::Instant::now();
    let why = limit.await.expect("limits");
    assert_eq!(closed_at.elapsed(), UNUSED_TIMEOUT);
    assert!(why.contains("no channel open"), "{why}");
}

#[test]
fn only_fd_forward_with_one_path_is_recognised() {
    assert_eq!(
        fd_forward_path("fleetctl fd-forward /var/run/fleet.sock"),
        Some("/var/run/fleet.sock")
    );
    for bad in [
        "fleetctl fd-forward",
        "fleetctl fd-forward /a /b",
        "fleetctl fd-forward /a; rm -rf /",
        "sh -c 'fleetctl fd-forward /a'",
        "fleetctl list-units",
    ] {
        assert_eq!(fd_forward_path(bad), None, "{bad}");
    }
}

#[test]
fn authorized_keys_lines_with_options_and_comments() {
    let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    let text = format!("# c\n\n{k} me@host\nrestrict,command=\"x\" {k}\nnot a key\n");
    assert_eq!(authorized_keys(&text).len(), 2);
}
