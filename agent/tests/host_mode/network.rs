//! The guest network (interfaces, routes, neighbours) and port forwarding.

use super::*;

/// A veth pair in the agent's own network namespace: `tmp0` (MAC
/// 52:54:00:12:34:56, down) for the agent to configure, and its peer.
/// Loopback is up, as the guest's PID 1 leaves it.
const NETNS_SETUP: &str = "ip link set lo up && \
    ip link add tmp0 address 52:54:00:12:34:56 type veth peer name peer0 && \
    ip link set peer0 up";

const MAC: &str = "52:54:00:12:34:56";

/// `ip -j <args>` run in the agent's network namespace.
fn ip_json(agent: &Agent, args: &[&str]) -> Value {
    let output = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", agent.host_pid()))
        .args(["ip", "-j"])
        .args(args)
        .output()
        .expect("cannot run nsenter (util-linux)");
    assert!(output.status.success(), "ip {args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// "address/prefix" of each address `ip -j addr show dev <dev>` lists.
fn addresses(agent: &Agent, dev: &str) -> Vec<String> {
    ip_json(agent, &["addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn addr(address: &str, prefix_len: u32) -> pb::IpAddress {
    pb::IpAddress {
        address: address.into(),
        prefix_len,
    }
}

fn route(destination: &str, gateway: &str, device: &str, metric: u32) -> pb::Route {
    pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
        source: String::new(),
        metric,
    }
}

#[tokio::test]
async fn network_interfaces_routes_and_neighbours() {
    let mut agent = Agent::start_in_netns(NETNS_SETUP).await;
    let c = &mut agent.client;
    let interfaces = c
        .list_interfaces(pb::ListInterfacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .interfaces;
    let tmp0 = interfaces.iter().find(|i| i.mac == MAC).unwrap();
    assert_eq!(tmp0.name, "tmp0");
    assert!(!tmp0.up);
    assert!(interfaces.iter().any(|i| i.name == "lo" && i.up));

    // Rename, MTU, IPv4 and IPv6 addresses, up.
    let eth0 = c
        .update_interface(pb::UpdateInterfaceRequest {
            interface: Some(pb::Interface {
                name: "eth0".into(),
                mac: MAC.to_uppercase(),
                mtu: 1400,
                addresses: vec![addr("10.88.0.5", 16), addr("fd00::5", 64)],
                up: true,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .interface
        .unwrap();
    assert_eq!(
        (eth0.name.as_str(), eth0.mac.as_str(), eth0.mtu, eth0.up),
        ("eth0", MAC, 1400, true)
    );
    for a in ["10.88.0.5", "fd00::5"] {
        assert!(eth0.addresses.iter().any(|x| x.address == a), "{eth0:?}");
    }
    let link = &ip_json(&agent, &["link", "show", "dev", "eth0"])[0];
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], MAC);
    assert!(
        link["flags"].as_array().unwrap().contains(&json!("UP")),
        "{link}"
    );
    let now = addresses(&agent, "eth0");
    assert!(now.contains(&"10.88.0.5/16".into()), "{now:?}");
    assert!(now.contains(&"fd00::5/64".into()), "{now:?}");

    // Addresses are replaced (the IPv6 link-local one stays); by name too.
    let c = &mut agent.client;
    c.update_interface(pb::UpdateInterfaceRequest {
        interface: Some(pb::Interface {
            name: "eth0".into(),
            addresses: vec![addr("10.88.0.6", 16), addr("fd00::5", 64)],
            up: true,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let now = addresses(&agent, "eth0");
    assert!(now.contains(&"10.88.0.6/16".into()), "{now:?}");
    assert!(!now.contains(&"10.88.0.5/16".into()), "{now:?}");
    assert!(now.contains(&"fd00::5/64".into()), "{now:?}");
    assert!(now.iter().any(|a| a.starts_with("fe80:")), "{now:?}");

    // Routes: a device route, default gateways of both families, a
    // gateway route with a metric.
    let c = &mut agent.client;
    let routes = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![
                route("10.88.0.0/16", "", "eth0", 0),
                route("", "10.88.0.1", "eth0", 0),
                route("192.168.10.0/24", "10.88.0.1", "eth0", 100),
                route("::/0", "fd00::1", "eth0", 0),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .routes;
    let has = |routes: &[pb::Route], dst: &str, gw: &str| {
        routes
            .iter()
            .any(|r| r.destination == dst && r.gateway == gw && r.device == "eth0")
    };
    assert!(has(&routes, "0.0.0.0/0", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "192.168.10.0/24", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "::/0", "fd00::1"), "{routes:?}");
    assert!(has(&routes, "10.88.0.0/16", ""), "{routes:?}");
    let v4 = ip_json(&agent, &["-4", "route"]);
    let v4 = v4.as_array().unwrap();
    assert!(
        v4.iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.88.0.1" && r["dev"] == "eth0"),
        "{v4:?}"
    );
    assert!(
        v4.iter()
            .any(|r| r["dst"] == "192.168.10.0/24" && r["metric"] == 100),
        "{v4:?}"
    );
    let v6 = ip_json(&agent, &["-6", "route"]);
    assert!(
        v6.as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "fd00::1"),
        "{v6:?}"
    );

    // Replacing drops the routes not asked for again; the kernel's routes
    // for the interface's own addresses stay.
    let c = &mut agent.client;
    c.update_routes(pb::UpdateRoutesRequest {
        routes: vec![route("", "10.88.0.1", "eth0", 0)],
    })
    .await
    .unwrap();
    let routes = c
        .list_routes(pb::ListRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert!(has(&routes, "0.0.0.0/0", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "10.88.0.0/16", ""), "{routes:?}");
    assert!(!has(&routes, "192.168.10.0/24", "10.88.0.1"), "{routes:?}");
    assert!(!has(&routes, "::/0", "fd00::1"), "{routes:?}");
    let v4 = ip_json(&agent, &["-4", "route"]);
    assert!(
        !v4.as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "192.168.10.0/24"),
        "{v4:?}"
    );

    // Permanent neighbour entries, IPv4 and IPv6; adding again replaces.
    let neighbor = |ip: &str, mac: &str| pb::Neighbor {
        ip: ip.into(),
        mac: mac.into(),
        device: "eth0".into(),
    };
    let c = &mut agent.client;
    for mac in ["52:54:00:aa:bb:01", "52:54:00:aa:bb:cc"] {
        c.add_neighbors(pb::AddNeighborsRequest {
            neighbors: vec![neighbor("10.88.0.1", mac), neighbor("fd00::1", mac)],
        })
        .await
        .unwrap();
    }
    let neigh = ip_json(&agent, &["neigh", "show", "dev", "eth0"]);
    for dst in ["10.88.0.1", "fd00::1"] {
        assert!(
            neigh.as_array().unwrap().iter().any(|n| n["dst"] == dst
                && n["lladdr"] == "52:54:00:aa:bb:cc"
                && n["state"].as_array().unwrap().contains(&json!("PERMANENT"))),
            "{neigh:?}"
        );
    }

    // Loopback is left alone, and up.
    let lo = &ip_json(&agent, &["addr", "show", "dev", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().contains(&json!("UP")),
        "{lo}"
    );
    assert_eq!(lo["addr_info"][0]["local"], "127.0.0.1");
}

#[tokio::test]
async fn bad_network_requests_are_refused() {
    let mut agent = Agent::start_in_netns(NETNS_SETUP).await;
    let c = &mut agent.client;
    let interface = |mac: &str, addresses: Vec<pb::IpAddress>| pb::UpdateInterfaceRequest {
        interface: Some(pb::Interface {
            name: "eth0".into(),
            mac: mac.into(),
            mtu: 0,
            addresses,
            up: true,
        }),
    };
    let bad = [
        (
            interface("52:54:00:12:34", vec![]),
            Code::InvalidArgument,
            "52:54:00:12:34",
        ),
        (
            interface(MAC, vec![addr("10.88.0.300", 16)]),
            Code::InvalidArgument,
            "10.88.0.300",
        ),
        // Checked in full first: the good address is not added either.
        (
            interface(MAC, vec![addr("10.88.0.5", 16), addr("10.88.0.6", 33)]),
            Code::InvalidArgument,
            "33",
        ),
        (
            interface(MAC, vec![addr("fd00::5", 129)]),
            Code::InvalidArgument,
            "129",
        ),
        (
            interface("52:54:00:00:00:99", vec![]),
            Code::NotFound,
            "52:54:00:00:00:99",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "nope0".into(),
                    ..Default::default()
                }),
            },
            Code::NotFound,
            "nope0",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "lo".into(),
                    up: false,
                    ..Default::default()
                }),
            },
            Code::InvalidArgument,
            "loopback",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "peer0".into(),
                    mac: MAC.into(),
                    ..Default::default()
                }),
            },
            Code::AlreadyExists,
            "peer0",
        ),
        (
            pb::UpdateInterfaceRequest { interface: None },
            Code::InvalidArgument,
            "missing",
        ),
    ];
    for (request, code, text) in bad {
        let err = c.update_interface(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(err.message().contains(text), "{request:?}: {err:?}");
    }
    assert_eq!(
        addresses(&agent, "tmp0")
            .iter()
            .filter(|a| !a.starts_with("fe80:"))
            .count(),
        0
    );
    let lo = &ip_json(&agent, &["link", "show", "dev", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().contains(&json!("UP")),
        "{lo}"
    );

    let c = &mut agent.client;
    let bad_routes = [
        (
            route("10.88.0.0/33", "", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.0/33",
        ),
        (
            route("10.88.0.5/16", "", "tmp0", 0),
            Code::InvalidArgument,
            "host bits",
        ),
        (
            route("10.88.0.0", "", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.0",
        ),
        (
            route("", "10.88.0.1.2", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.1.2",
        ),
        (
            route("10.0.0.0/8", "fd00::1", "tmp0", 0),
            Code::InvalidArgument,
            "family",
        ),
        (
            route("10.0.0.0/8", "", "", 0),
            Code::InvalidArgument,
            "neither",
        ),
        (route("10.0.0.0/8", "", "nope0", 0), Code::NotFound, "nope0"),
    ];
    for (r, code, text) in bad_routes {
        let err = c
            .update_routes(pb::UpdateRoutesRequest {
                routes: vec![route("10.99.0.0/16", "", "tmp0", 0), r.clone()],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{r:?}: {err:?}");
        assert!(err.message().contains(text), "{r:?}: {err:?}");
    }
    // Nothing was added by the refused requests.
    let v4 = ip_json(&agent, &["-4", "route"]);
    assert_eq!(v4, json!([]), "{v4:?}");
    // A gateway the kernel cannot reach is the caller's mistake too.
    let c = &mut agent.client;
    let err = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![route("", "10.200.0.1", "tmp0", 0)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("10.200.0.1"), "{err:?}");

    let neighbor = |ip: &str, mac: &str, device: &str| pb::AddNeighborsRequest {
        neighbors: vec![pb::Neighbor {
            ip: ip.into(),
            mac: mac.into(),
            device: device.into(),
        }],
    };
    for (request, code, text) in [
        (
            neighbor("10.88.0.1", "52:54:00:aa:bb:cc", "nope0"),
            Code::NotFound,
            "nope0",
        ),
        (
            neighbor("10.88.0.1", "52:54:00:aa:bb", "tmp0"),
            Code::InvalidArgument,
            "52:54:00:aa:bb",
        ),
        (
            neighbor("10.88.1", "52:54:00:aa:bb:cc", "tmp0"),
            Code::InvalidArgument,
            "10.88.1",
        ),
    ] {
        let err = c.add_neighbors(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(err.message().contains(text), "{request:?}: {err:?}");
    }
}

/// Opens a PortForward stream to `port`; the sender carries the data
/// chunks that follow the first message.
async fn port_forward(
    client: &mut Client,
    port: u32,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::PortForwardData>,
        tonic::Streaming<pb::PortForwardData>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PortForwardData { port, data: vec![] })
        .await
        .unwrap();
    let responses = client
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

fn data(data: &[u8]) -> pb::PortForwardData {
    pb::PortForwardData {
        port: 0,
        data: data.to_vec(),
    }
}

/// The agent shares this test's network namespace (`Agent::start`), so a
/// listener on 127.0.0.1 here is one in the "sandbox".
#[tokio::test]
async fn port_forward_echoes_a_mebibyte_and_half_closes() {
    let mut agent = Agent::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Echoes until the client half-closes, then closes its own side.
    let echo = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = socket.into_split();
        let n = tokio::io::copy(&mut rd, &mut wr).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await.unwrap();
        n
    });
    let (tx, mut responses) = port_forward(&mut agent.client, port.into()).await.unwrap();

    let sent: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect();
    let to_send = sent.clone();
    // Odd chunk sizes, so message and read boundaries never line up.
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(10_007) {
            tx.send(data(chunk)).await.unwrap();
        }
        tx.send(data(&[])).await.unwrap();
        // Keep the request stream open: the half-close must come from the
        // empty chunk, and the server's stream must end on its own.
        tx
    });

    let mut received = Vec::with_capacity(sent.len());
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = responses.message().await.unwrap() {
            assert!(!message.data.is_empty());
            assert!(message.data.len() <= 32 * 1024);
            received.extend_from_slice(&message.data);
        }
    });
    read.await.expect("the forwarded stream did not end");
    let _tx = writer.await.unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the echoed bytes differ from those sent");
    assert_eq!(echo.await.unwrap(), sent.len() as u64);
}

#[tokio::test]
async fn port_forward_refusals() {
    // Own network namespace with loopback up: nothing listens anywhere.
    let mut agent = Agent::start_in_netns("ip link set lo up").await;
    let c = &mut agent.client;

    let e = port_forward(c, 8080).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("nothing listens on 127.0.0.1:8080 in the sandbox"),
        "{e:?}"
    );

    for port in [0, 65536, u32::MAX] {
        let e = port_forward(c, port).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "port {port}: {e:?}");
        assert!(e.message().contains(&port.to_string()), "{e:?}");
    }

    let e = c
        .port_forward(tokio_stream::empty::<pb::PortForwardData>())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("first message"), "{e:?}");
}

#[tokio::test]
async fn port_forward_ends_when_the_guest_side_closes() {
    let mut agent = Agent::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Greets, reads one line and closes, whatever the client still sends.
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (socket, _) = listener.accept().await.unwrap();
        let mut socket = tokio::io::BufReader::new(socket);
        socket.get_mut().write_all(b"hello\n").await.unwrap();
        let mut line = String::new();
        socket.read_line(&mut line).await.unwrap();
        socket.get_mut().write_all(b"bye\n").await.unwrap();
        line
    });
    let (tx, mut responses) = port_forward(&mut agent.client, port.into()).await.unwrap();
    tx.send(data(b"ping\n")).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = responses.message().await.unwrap() {
            received.extend_from_slice(&message.data);
        }
    })
    .await
    .expect("the stream did not end when the guest side closed");
    assert_eq!(received, b"hello\nbye\n");
    assert_eq!(server.await.unwrap(), "ping\n");
    // The request stream is still open: the agent ended the RPC.
    drop(tx);
}
