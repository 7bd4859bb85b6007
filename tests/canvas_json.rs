//! Canvas signatures built in Rust serialize to the bytes Celery 5.7.0 writes for the same
//! canvas (`tests/fixtures/canvas/signatures/`, captured with kombu's JSON encoder), and
//! Celery's forms, built-time upgrades included, parse back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use celeriac::Signature;
use celeriac::canvas::{chain, chord, group};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../../tests/fixtures/canvas/signatures/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn task(name: &str, args: &[i64]) -> Signature {
    Signature::new(format!("tasks.{name}"), args.iter().map(|a| (*a).into()).collect())
}

fn assert_same(name: &str, sig: &Signature) {
    let ours = String::from_utf8(sig.to_wire()).unwrap();
    let celery = String::from_utf8(fixture(name)).unwrap();
    assert_eq!(ours, celery, "{name}: Rust vs Celery bytes");
    // And Celery's bytes parse back to the same signature.
    assert_eq!(&Signature::from_wire(celery.as_bytes()).unwrap(), sig, "{name}: parsed back");
}

#[test]
fn plain_signatures_and_options() {
    assert_same("task_sig", &task("add", &[2, 2]));
    assert_same("task_sig_options", &task("add", &[2, 2]).queue("q").countdown(5.0).priority(3));
    assert_same("immutable", &task("add", &[1, 1]).immutable());
    assert_same("link_options", &task("add", &[1, 1]).link(task("mul", &[2])).link_error(task("on_err", &[])));
}

#[test]
fn chains_groups_chords_and_nesting() {
    assert_same("chain", &chain([task("add", &[1, 1]), task("mul", &[2]), task("tsum", &[])]));
    assert_same("group", &group([task("add", &[1, 1]), task("add", &[2, 2])]));
    assert_same("chord", &chord([task("add", &[1, 1]), task("add", &[2, 2])], task("tsum", &[])));
    assert_same("chain_in_group", &group([chain([task("add", &[1, 1]), task("mul", &[2])]), task("add", &[3, 3])]));
    assert_same(
        "chain_in_chord_header",
        &chord([chain([task("add", &[1, 1]), task("mul", &[2])]), task("add", &[3, 3])], task("tsum", &[])),
    );
    assert_same("nested_group", &group([group([task("add", &[1, 1]), task("add", &[2, 2])]), task("add", &[3, 3])]));
    // Celery upgrades these while building (a group before a step becomes a chord; a step after a
    // chord joins the chord's body); written the upgraded way, ours are the same bytes.
    assert_same(
        "group_in_chain",
        &chain([task("add", &[1, 1]), chord([task("add", &[1]), task("add", &[2])], task("tsum", &[]))]),
    );
    assert_same(
        "chord_in_chain",
        &chain([
            task("add", &[1, 1]),
            chord([task("add", &[1]), task("add", &[2])], chain([task("tsum", &[]), task("mul", &[10])])),
        ]),
    );
}

#[test]
fn every_frozen_celery_form_parses() {
    let dir = format!("{}/../../tests/fixtures/canvas/signatures", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = if bytes.starts_with(b"[") {
            serde_json::from_slice::<Vec<Signature>>(&bytes).map(|v| v.len())
        } else {
            Signature::from_wire(&bytes).map(|_| 1)
        };
        assert!(parsed.is_ok(), "{}: {:?}", path.display(), parsed.err());
        n += 1;
    }
    assert!(n >= 26, "{n} fixtures");
}

/// The first message a Rust client sends for a chain carries the same body as Celery's
/// (`messages/chain3.json`): the rest of the chain in `embed.chain`, last step first, with the
/// pre-assigned task ids. (`reply_to` is each client's own id, as Celery's `thread_oid`: it
/// differs between the two and is compared apart.)
#[tokio::test]
async fn a_rust_chain_message_matches_celerys() {
    use celeriac::protocol::{Message, TaskBody};
    let celery = Message::from_wire(
        &std::fs::read(format!("{}/../../tests/fixtures/messages/chain3.json", env!("CARGO_MANIFEST_DIR"))).unwrap(),
    )
    .unwrap();
    let mut celery_body = celery.task_body().unwrap();
    let steps = celery_body.embed.as_mut().unwrap().chain.as_mut().unwrap();
    for s in steps.iter_mut() {
        s.options.remove("reply_to");
    }
    let ids: Vec<String> = steps.iter().map(|s| s.task_id().unwrap().to_owned()).collect();

    let app = celeriac::App::builder().broker_url("memory://").build().await.unwrap();
    let flow = chain([
        task("add", &[1, 2]).with_task_id(&celery.headers.id),
        task("mul", &[10]).with_task_id(&ids[1]),
        task("add", &[100, 200]).immutable().with_task_id(&ids[0]),
    ]);
    let result = flow.delay(&app).await.unwrap();
    assert_eq!(result.id(), ids[0], "a chain's result is its last step's");
    let sent = app.broker().fetch(&["celery".to_owned()], 10, std::time::Duration::ZERO).await.unwrap();
    assert_eq!(sent.len(), 1, "only the first step is published");
    let ours = Message::from_wire(&sent[0].payload).unwrap();
    let mut ours_body: TaskBody = ours.task_body().unwrap();
    for s in ours_body.embed.as_mut().unwrap().chain.as_mut().unwrap().iter_mut() {
        assert_eq!(s.options.remove("reply_to"), Some(app.oid().into()), "steps carry the sender's reply_to");
    }
    assert_eq!(ours.properties.reply_to.as_deref(), Some(app.oid()));
    assert_eq!(String::from_utf8(ours_body.to_wire()).unwrap(), String::from_utf8(celery_body.to_wire()).unwrap());
    assert_eq!(ours.headers.task, celery.headers.task);
    assert_eq!(ours.headers.root_id, celery.headers.root_id);
}
