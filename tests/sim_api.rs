//! The fleet API simulator against reference section A: status codes, messages, empty pages,
//! pagination tokens, percent-decoding and the PUT decision table.

mod support;

use std::io::{Read, Write};

use support::*;

/// A raw request with arbitrary headers; returns status, head and body.
fn raw(sim: &SimServer, req: &str) -> (u16, String, Vec<u8>) {
    let mut s = std::os::unix::net::UnixStream::connect(&sim.socket).expect("connect");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let (status, body) = parse_response(&out).expect("response");
    (status, head, body)
}

fn put(sim: &SimServer, path: &str, ct: Option<&str>, body: &str) -> (u16, String) {
    let ct = ct
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let req = format!("PUT {path} HTTP/1.1\r\nHost: domain-sock\r\nConnection: close\r\n{ct}Content-Length: {}\r\n\r\n{body}", body.len());
    let (status, _, body) = raw(sim, &req);
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn get(sim: &SimServer, path: &str) -> (u16, String) {
    let (s, b) = http(&sim.socket, "GET", path, None);
    (s, String::from_utf8_lossy(&b).into_owned())
}

const HELLO: &str = r#"{"name":"hello.service","options":[{"name":"Description","section":"Unit","value":"Hello World"},{"name":"ExecStart","section":"Service","value":"/bin/sleep 3000"}]}"#;

#[test]
fn routing_fallbacks_and_headers() {
    let sim = SimServer::start();
    assert_eq!(
        get(&sim, "/"),
        (405, r#"{"error":{"code":405,"message":""}}"#.into())
    );
    assert_eq!(
        get(&sim, "/fleet/v1"),
        (405, r#"{"error":{"code":405,"message":""}}"#.into())
    );
    assert_eq!(
        get(&sim, "/nope"),
        (404, r#"{"error":{"code":404,"message":""}}"#.into())
    );
    assert_eq!(get(&sim, "/fleet/v1/machines/").0, 404);
    assert_eq!(get(&sim, "/fleet/v1/units/").0, 404);
    assert_eq!(get(&sim, "/fleet/v1/units"), (200, "{}".into()));
    assert_eq!(
        get(&sim, "/v1-alpha/machines"),
        get(&sim, "/fleet/v1/machines")
    );
    let (_, head, _) = raw(
        &sim,
        "GET /fleet/v1/units HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        head.contains("server: fleetd/") || head.contains("Server: fleetd/"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let (s, b) = {
        let (s, b) = http(&sim.socket, "POST", "/fleet/v1/units", Some("{}"));
        (s, String::from_utf8_lossy(&b).into_owned())
    };
    assert_eq!(
        (s, b.as_str()),
        (
            405,
            r#"{"error":{"code":405,"message":"only GET supported against this resource"}}"#
        )
    );
    let (s, b) = http(&sim.socket, "POST", "/fleet/v1/units/a.service", Some("{}"));
    assert_eq!(s, 405);
    assert!(String::from_utf8_lossy(&b)
        .contains("only GET, PUT and DELETE supported against this resource"));
    assert_eq!(
        http(&sim.socket, "DELETE", "/fleet/v1/machines", None).0,
        405
    );
    assert_eq!(
        http(&sim.socket, "POST", "/fleet/v1/discovery", Some("{}")).0,
        400
    );
    assert_eq!(get(&sim, "/fleet/v1/discovery").0, 200);
}

#[test]
fn put_decision_table() {
    let sim = SimServer::start();
    // Section A's handler table, not fleet's timing (B.6): states show at once.
    sim.sim.lock().expect("sim").timing = fleet_broker::sim::Timing::Instant;
    let p = "/fleet/v1/units/hello.service?alt=json";
    assert_eq!(
        put(&sim, p, None, HELLO),
        (
            415,
            r#"{"error":{"code":415,"message":"expected 1 Content-Type, got 0"}}"#.into()
        )
    );
    assert_eq!(
        put(&sim, p, Some("text/plain"), HELLO).1,
        r#"{"error":{"code":415,"message":"only acceptable Content-Type is application/json"}}"#
    );
    assert_eq!(put(&sim, p, Some("application/json"), "{").0, 400);
    assert!(put(&sim, p, Some("application/json"), "{")
        .1
        .contains("unable to decode body: "));
    assert_eq!(
        put(
            &sim,
            "/fleet/v1/units/other.service",
            Some("application/json"),
            HELLO
        )
        .1,
        r#"{"error":{"code":400,"message":"name in URL \"other.service\" differs from unit name in request body \"hello.service\""}}"#
    );
    assert_eq!(
        put(
            &sim,
            "/fleet/v1/units/bad.foo",
            Some("application/json"),
            "{}"
        )
        .1,
        r#"{"error":{"code":400,"message":"invalid unit type: \"foo\""}}"#
    );
    assert_eq!(
        put(
            &sim,
            p,
            Some("application/json"),
            r#"{"desiredState":"launched"}"#
        )
        .1,
        r#"{"error":{"code":409,"message":"unit does not exist and options field empty"}}"#
    );
    assert_eq!(
        put(&sim, p, Some("application/json; charset=utf-8"), HELLO),
        (201, String::new())
    );
    let (s, b) = get(&sim, "/fleet/v1/units/hello.service");
    assert_eq!(s, 200);
    assert_eq!(
        b,
        r#"{"currentState":"inactive","desiredState":"inactive","name":"hello.service","options":[{"name":"Description","section":"Unit","value":"Hello World"},{"name":"ExecStart","section":"Service","value":"/bin/sleep 3000"}]}"#
    );
    assert_eq!(
        put(
            &sim,
            p,
            Some("application/json"),
            r#"{"name":"hello.service"}"#
        )
        .1,
        r#"{"error":{"code":409,"message":"must provide DesiredState to update existing unit"}}"#
    );
    assert_eq!(
        put(
            &sim,
            p,
            Some("application/json"),
            r#"{"desiredState":"launched","name":"hello.service"}"#
        ),
        (204, String::new())
    );
    let (_, b) = get(&sim, "/fleet/v1/units/hello.service");
    assert!(b.starts_with(r#"{"currentState":"launched","desiredState":"launched","machineID":"113f16a7b8a94d0e9e4a2b1c3d5e7f90""#), "{b}");
    let (_, st) = get(&sim, "/fleet/v1/state");
    assert!(st.contains(r#""systemdActiveState":"active","systemdLoadState":"loaded","systemdSubState":"running""#), "{st}");
    // The state value is not validated on update.
    assert_eq!(
        put(
            &sim,
            p,
            Some("application/json"),
            r#"{"desiredState":"bogus"}"#
        )
        .0,
        204
    );
    // Invalid desiredState on create: 500 with an empty message.
    let body = HELLO
        .replace("hello.service", "x.service")
        .replace("\"options\"", "\"desiredState\":\"bogus\",\"options\"");
    assert_eq!(
        put(
            &sim,
            "/fleet/v1/units/x.service",
            Some("application/json"),
            &body
        )
        .1,
        r#"{"error":{"code":500,"message":""}}"#
    );
    // Templates: created, but not activated.
    let t = r#"{"options":[{"name":"ExecStart","section":"Service","value":"/bin/true"}]}"#;
    assert_eq!(
        put(
            &sim,
            "/fleet/v1/units/web%40.service",
            Some("application/json"),
            t
        )
        .0,
        201
    );
    assert_eq!(get(&sim, "/fleet/v1/units/web%40.service").0, 200);
    assert_eq!(
        put(
            &sim,
            "/fleet/v1/units/web%40.service",
            Some("application/json"),
            r#"{"desiredState":"launched"}"#
        )
        .1,
        r#"{"error":{"code":400,"message":"cannot activate template \"web@.service\""}}"#
    );
    assert_eq!(
        http(
            &sim.socket,
            "DELETE",
            "/fleet/v1/units/web%40.service",
            None
        )
        .0,
        204
    );
    assert_eq!(
        get(&sim, "/fleet/v1/units/web%40.service"),
        (
            404,
            r#"{"error":{"code":404,"message":"unit does not exist"}}"#.into()
        )
    );
    assert_eq!(
        http(
            &sim.socket,
            "DELETE",
            "/fleet/v1/units/web%40.service",
            None
        )
        .0,
        404
    );
}

#[test]
fn pagination_follows_tokens_including_the_exact_fill_quirk() {
    let sim = SimServer::start();
    sim.sim.lock().expect("sim").put_many(
        (0..200)
            .map(|i| {
                (
                    format!("u{i:03}.service"),
                    vec![opt("Service", "ExecStart", "/bin/true")],
                    "inactive".to_string(),
                )
            })
            .collect(),
    );
    let (_, p1) = get(&sim, "/fleet/v1/units");
    let v: serde_json::Value = serde_json::from_str(&p1).expect("json");
    assert_eq!(v["units"].as_array().expect("units").len(), 100);
    assert_eq!(v["nextPageToken"], "ZAACAA==");
    assert!(p1.starts_with(r#"{"nextPageToken":"ZAACAA==","units":["#));
    let (_, p2) = get(&sim, "/fleet/v1/units?nextPageToken=ZAACAA%3D%3D");
    let v: serde_json::Value = serde_json::from_str(&p2).expect("json");
    assert_eq!(v["units"].as_array().expect("units").len(), 100);
    assert_eq!(v["units"][0]["name"], "u100.service");
    assert_eq!(
        v["nextPageToken"], "ZAADAA==",
        "exactly full last page still has a token"
    );
    assert_eq!(
        get(&sim, "/fleet/v1/units?nextPageToken=ZAADAA%3D%3D"),
        (200, "{}".into())
    );
    assert_eq!(
        get(&sim, "/fleet/v1/units?nextPageToken=AgACAA%3D%3D").1,
        r#"{"error":{"code":400,"message":"token limit must be 100"}}"#
    );
    assert_eq!(
        get(&sim, "/fleet/v1/units?nextPageToken=a&nextPageToken=b").1,
        r#"{"error":{"code":400,"message":"too many values for page token"}}"#
    );
}

#[test]
fn state_filters_and_machine_patch() {
    let sim = SimServer::start();
    sim.put(
        "a.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "launched",
    );
    sim.put(
        "b.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "loaded",
    );
    let (_, all) = get(&sim, "/fleet/v1/state");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&all).expect("json")["states"]
            .as_array()
            .expect("states")
            .len(),
        2
    );
    let (_, one) = get(&sim, "/fleet/v1/state?unitName=b.service");
    assert!(one.contains(r#""name":"b.service","systemdActiveState":"inactive","systemdLoadState":"loaded","systemdSubState":"dead""#), "{one}");
    assert_eq!(
        get(&sim, "/fleet/v1/state?machineID=none"),
        (200, "{}".into())
    );
    let (s, b) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(r#"[{"op":"add","path":"/85c0c595/metadata/role","value":{"value":"web"}}]"#),
    );
    assert_eq!((s, b.len()), (204, 0));
    let (s, b) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(r#"[{"op":"bump","path":"/x/metadata/k"}]"#),
    );
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&b).contains("invalid op: expect add, remove, or replace"));
    let (_, b) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(r#"[{"op":"add","path":"/x/meta/k","value":{"value":"v"}}]"#),
    );
    assert!(String::from_utf8_lossy(&b).contains("machine metadata path invalid"));
}

/// Where the simulator used to answer otherwise than fleet's handlers and Go's server.
#[test]
fn answers_as_fleet_and_go_do_where_the_simulator_once_differed() {
    let sim = SimServer::start();
    let id = {
        let s = sim.sim.lock().expect("sim");
        s.machines()[0].id.clone()
    };
    // PATCH of machine metadata is applied (and removed again).
    let (s, _) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(&format!(
            r#"[{{"op":"add","path":"/{id}/metadata/tier","value":{{"value":"edge"}}}}]"#
        )),
    );
    assert_eq!(s, 204);
    let (_, machines) = get(&sim, "/fleet/v1/machines");
    assert!(
        machines.contains(&format!(r#""id":"{id}","metadata":{{"#))
            && machines.contains(r#""tier":"edge""#),
        "{machines}"
    );
    let (s, _) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(&format!(
            r#"[{{"op":"remove","path":"/{id}/metadata/tier"}}]"#
        )),
    );
    assert_eq!(s, 204);
    assert!(!get(&sim, "/fleet/v1/machines").1.contains("tier"));

    // A target state fleet does not know is stored (204) but never becomes a current state.
    sim.put(
        "a.service",
        vec![opt("Service", "ExecStart", "/bin/true")],
        "launched",
    );
    let (s, _) = put(
        &sim,
        "/fleet/v1/units/a.service",
        Some("application/json"),
        r#"{"desiredState":"bogus"}"#,
    );
    assert_eq!(s, 204);
    let (_, unit) = get(&sim, "/fleet/v1/units/a.service");
    assert!(unit.contains(r#""currentState":"launched""#), "{unit}");

    // A path that is not clean is redirected as Go's ServeMux does, query and all.
    let (s, head, body) = raw(
        &sim,
        "GET /fleet/v1//units?alt=json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(s, 301, "{head}");
    assert!(
        head.contains("Location: /fleet/v1/units?alt=json")
            || head.contains("location: /fleet/v1/units?alt=json"),
        "{head}"
    );
    assert_eq!(
        String::from_utf8_lossy(&body),
        "<a href=\"/fleet/v1/units?alt=json\">Moved Permanently</a>.\n\n"
    );

    // `%2F` splits the path: no handler, 404.
    assert_eq!(
        get(&sim, "/fleet/v1/units/a%2Fb.service"),
        (404, r#"{"error":{"code":404,"message":""}}"#.into())
    );

    // A body that is not JSON gets Go's words; what follows the first value is not read.
    for (body, why) in [
        (r#"{"name":"#, "unexpected EOF"),
        ("", "EOF"),
        (
            "{'a'}",
            // The JSON text escapes the backslash Go puts before the quote.
            r"invalid character '\\'' looking for beginning of object key string",
        ),
        // Well formed, the wrong shape: Go's type error, the field named by its path.
        (
            r#"{"name":1}"#,
            "json: cannot unmarshal number into Go struct field Unit.name of type string",
        ),
        (
            r#"{"options":[{"section":"Service","name":"ExecStart","value":["/bin/true"]}]}"#,
            "json: cannot unmarshal array into Go struct field UnitOption.options.value of type string",
        ),
    ] {
        let (s, answer) = put(
            &sim,
            "/fleet/v1/units/c.service",
            Some("application/json"),
            body,
        );
        assert_eq!(s, 400, "{body:?}");
        assert_eq!(
            answer,
            format!(r#"{{"error":{{"code":400,"message":"unable to decode body: {why}"}}}}"#),
            "{body:?}"
        );
    }
    let (s, _) = put(
        &sim,
        "/fleet/v1/units/c.service",
        Some("application/json"),
        &format!("{} trailing", HELLO.replace("hello.service", "c.service")),
    );
    assert_eq!(s, 201);
    // Keys match whatever their case, `null` is no value, and an option with an empty
    // value is stored and answered without one, as fleetd's omitempty fields are.
    let (s, answer) = put(
        &sim,
        "/fleet/v1/units/d.service",
        Some("application/json"),
        r#"{"Name":"d.service","DESIREDSTATE":"inactive","machineID":null,"Options":[
            {"section":"Service","name":"ExecStartPre","value":""},
            {"section":"Service","name":"ExecStart","value":"/bin/true"}]}"#,
    );
    assert_eq!(s, 201, "{answer}");
    let (_, unit) = get(&sim, "/fleet/v1/units/d.service");
    assert!(
        unit.contains(r#"{"name":"ExecStartPre","section":"Service"},{"name":"ExecStart","#),
        "{unit}"
    );
    // The nested value of a metadata op; the flat form is Go's type error.
    let (s, answer) = http(
        &sim.socket,
        "PATCH",
        "/fleet/v1/machines",
        Some(&format!(
            r#"[{{"op":"add","path":"/{id}/metadata/tier","value":"edge"}}]"#
        )),
    );
    assert_eq!(s, 400);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("json: cannot unmarshal string into Go struct field machineMetadataOp.Value of type api.ValueType"),
        "{answer}"
    );

    // A 415 comes after the body is read: a client sending 1 MiB is not cut off.
    let big = "x".repeat(1 << 20);
    let (s, body) = put(&sim, "/fleet/v1/units/b.service", Some("text/plain"), &big);
    assert_eq!(s, 415);
    assert!(
        body.contains("only acceptable Content-Type is application/json"),
        "{body}"
    );
}

/// Our client asks for a listing's pages ahead (fleet's tokens are its page size and
/// number) and gets exactly what asking one page at a time gives: every size around the
/// page boundary, the exactly-full last page followed by `{}` included.
#[test]
fn pages_asked_ahead_give_what_one_page_at_a_time_gives() {
    let sim = SimServer::start();
    sim.sim.lock().expect("sim").token_limit = 7;
    for count in [0usize, 1, 6, 7, 8, 14, 15, 49, 50] {
        let mut s = sim.sim.lock().expect("sim");
        s.clear_units();
        s.put_many(
            (0..count)
                .map(|i| {
                    (
                        format!("u{i:03}.service"),
                        vec![opt("Service", "ExecStart", "/bin/true")],
                        "inactive".to_string(),
                    )
                })
                .collect(),
        );
        drop(s);
        let got = unit_files(&sim.socket);
        let want: Vec<String> = (0..count).map(|i| format!("u{i:03}.service")).collect();
        assert_eq!(got, want, "{count} units in pages of 7");
    }
}

/// A server whose tokens are not fleet's shape, or that names a page other than the next:
/// the client follows the server's tokens one page at a time.
#[test]
fn pages_follow_the_servers_tokens_whatever_their_shape() {
    use std::os::unix::net::UnixListener;
    // page token -> (unit names, next token)
    let serve = |pages: Vec<(&'static str, Vec<&'static str>, &'static str)>| {
        let dir = open_tempdir("fb-pages.");
        let path = dir.path().join("fleet.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let pages = pages.clone();
                std::thread::spawn(move || loop {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1];
                    while !req.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut b) {
                            Ok(1) => req.push(b[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&req).to_string();
                    let token = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.split("nextPageToken=").nth(1))
                        .map(|t| t.split('&').next().unwrap_or("").replace("%3D", "="))
                        .unwrap_or_default();
                    let machines = head.starts_with("GET /fleet/v1/machines");
                    let found = pages.iter().find(|(t, _, _)| *t == token);
                    let body = match found.filter(|_| !machines) {
                        None if machines => "{}".to_string(),
                        Some((_, names, next)) => {
                            let units: Vec<String> = names
                                .iter()
                                .map(|n| format!(r#"{{"name":"{n}","desiredState":"inactive"}}"#))
                                .collect();
                            let next = if next.is_empty() {
                                String::new()
                            } else {
                                format!(r#","nextPageToken":"{next}""#)
                            };
                            format!(r#"{{"units":[{}]{next}}}"#, units.join(","))
                        }
                        None => r#"{"error":{"code":400,"message":"bad token"}}"#.to_string(),
                    };
                    let status = if body.contains("error") {
                        "400 Bad Request"
                    } else {
                        "200 OK"
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                });
            }
        });
        (dir, path)
    };
    let names = |path: &std::path::Path| unit_files(path);
    // Opaque tokens.
    let (_d, path) = serve(vec![
        ("", vec!["a.service"], "second"),
        ("second", vec!["b.service"], "third"),
        ("third", vec!["c.service"], ""),
    ]);
    assert_eq!(names(&path), ["a.service", "b.service", "c.service"]);
    // Fleet-shaped tokens (limit 1): page 1 names page 3, which names page 2, then the end.
    let (_d, path) = serve(vec![
        ("", vec!["a.service"], "AQADAA=="),
        ("AQADAA==", vec!["c.service"], "AQACAA=="),
        ("AQACAA==", vec!["b.service"], ""),
        ("AQAEAA==", vec!["never.service"], "AQAFAA=="),
    ]);
    assert_eq!(names(&path), ["a.service", "c.service", "b.service"]);
}

/// `fleetctl list-unit-files` (units and machines, every page) straight on a fleet socket:
/// the unit names, in order.
fn unit_files(socket: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["list-unit-files", "--no-legend", "--fields", "unit"])
        .env_remove("FLEETCTL_CLUSTER")
        .env_remove("FLEETCTL_TUNNEL")
        .env_remove("FLEETCTL_ENDPOINT")
        .output()
        .expect("fleetctl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}
