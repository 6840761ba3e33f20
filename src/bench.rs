//! Load generator for `escrowctl bench put`: N concurrent clients write V-byte values for a
//! fixed time; the report gives throughput and latency percentiles. The same harness drives
//! etcd (feature `etcd-bench`) so both are measured with one workload shape.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{ClientConfig, EscrowClient};

/// Most concurrent clients a benchmark may start.
pub const BENCH_CLIENTS_MAX: usize = 1024;
/// The longest benchmark run: a day.
pub const BENCH_DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy)]
pub struct BenchSpec {
    pub clients: usize,
    pub value_bytes: usize,
    pub duration: Duration,
    /// Every value is the byte `x` repeated (how benchmarks were run before 2026-11-23). The
    /// default is random bytes, different for every put: customer data does not compress to
    /// nothing, and the state machine's LZ4 would otherwise make its flushes and compactions
    /// look far cheaper than they are (etcd stores values uncompressed either way).
    pub compressible: bool,
    /// Every run writes keys no earlier run wrote (a random run prefix), so every put is a
    /// first write. The default keys (`w{client}-{n}`) repeat across runs, so a run rewrites
    /// the keys earlier runs wrote as far as they got.
    pub new_keys: bool,
}

impl BenchSpec {
    /// A value for one put: `value_bytes` random bytes, or `x` repeated if `compressible`.
    fn value(&self) -> Vec<u8> {
        if self.compressible {
            return vec![b'x'; self.value_bytes];
        }
        let mut value = vec![0u8; self.value_bytes];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut value);
        value
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    pub clients: usize,
    pub value_bytes: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    /// Whether the values were the byte `x` repeated (see [`BenchSpec::compressible`]).
    pub compressible: bool,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl BenchReport {
    pub fn line(&self) -> String {
        format!(
            "{:<7} clients={:<3} value={}B ({})  {:>9.0} writes/s  p50={:.2}ms p99={:.2}ms max={:.2}ms  ops={} errors={}",
            self.target, self.clients, self.value_bytes, if self.compressible { "x repeated" } else { "random" },
            self.ops_per_sec, self.p50_ms, self.p99_ms, self.max_ms, self.ops, self.errors
        )
    }
}

fn new_histogram() -> hdrhistogram::Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn report(
    target: &str,
    spec: &BenchSpec,
    hist: &hdrhistogram::Histogram<u64>,
    errors: u64,
    elapsed: Duration,
) -> BenchReport {
    let ms = |us: u64| us as f64 / 1000.0;
    let seconds = elapsed.as_secs_f64();
    BenchReport {
        target: target.into(),
        clients: spec.clients,
        value_bytes: spec.value_bytes,
        ops: hist.len(),
        errors,
        seconds,
        ops_per_sec: hist.len() as f64 / seconds,
        compressible: spec.compressible,
        p50_ms: ms(hist.value_at_quantile(0.50)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
    }
}

fn validate(spec: &BenchSpec) -> anyhow::Result<()> {
    if spec.clients == 0 || spec.clients > BENCH_CLIENTS_MAX {
        anyhow::bail!("--clients must be 1 to {BENCH_CLIENTS_MAX}");
    }
    if spec.duration.is_zero() || spec.duration > BENCH_DURATION_MAX {
        anyhow::bail!("--seconds must be 1 to {}", BENCH_DURATION_MAX.as_secs());
    }
    if spec.value_bytes == 0 || spec.value_bytes > crate::domain::VALUE_LEN_MAX {
        anyhow::bail!(
            "--value-size must be 1 to {} bytes",
            crate::domain::VALUE_LEN_MAX
        );
    }
    Ok(())
}

/// Runs `op(worker, key, value)` from `spec.clients` tasks until the duration ends (each task
/// at least once), each call with a new key (`w<worker>-<n>`, after a random run prefix with
/// [`BenchSpec::new_keys`]) and a new value ([`BenchSpec::value`]).
async fn drive<F, Fut>(spec: &BenchSpec, op: F) -> (hdrhistogram::Histogram<u64>, u64, Duration)
where
    F: Fn(usize, String, Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let prefix = if spec.new_keys {
        format!("r{:08x}-", rand::random::<u32>())
    } else {
        String::new()
    };
    let started = Instant::now();
    let end = started + spec.duration;
    let mut tasks = Vec::new();
    for worker in 0..spec.clients {
        let (op, spec, prefix) = (op.clone(), *spec, prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut errors = 0u64;
            let mut seq = 0u64;
            loop {
                let t = Instant::now();
                if op(worker, format!("{prefix}w{worker}-{seq}"), spec.value()).await {
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    errors += 1;
                }
                seq += 1;
                if Instant::now() >= end {
                    break;
                }
            }
            (hist, errors)
        }));
    }
    let mut hist = new_histogram();
    let mut errors = 0;
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            errors += e;
        }
    }
    (hist, errors, started.elapsed())
}

/// The tenant the escrow benchmark writes into (registered if missing).
pub const BENCH_TENANT: &str = "bench";

/// Benchmarks puts against the escrow cluster described by `config`, each put with
/// `deadline` (retries included).
pub async fn run_escrow(
    config: &ClientConfig,
    spec: &BenchSpec,
    deadline: Duration,
) -> anyhow::Result<BenchReport> {
    validate(spec)?;
    // Put the leader first so writes are not forwarded (etcd's client also finds its way).
    let probe = EscrowClient::new(config)?.with_deadline(deadline);
    let status = probe.cluster_status().await?;
    let mut config = config.clone();
    if let Some(leader) = status.nodes.iter().find(|n| Some(n.id) == status.leader) {
        config.endpoints.retain(|e| *e != leader.addr);
        config.endpoints.insert(0, leader.addr.clone());
    }
    match probe
        .tenant(crate::client::TenantOp::Add, BENCH_TENANT)
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => {}
        Err(e) => return Err(e.into()),
    }
    let clients: Vec<std::sync::Arc<EscrowClient>> = (0..spec.clients)
        .map(|_| EscrowClient::new(&config).map(|c| std::sync::Arc::new(c.with_deadline(deadline))))
        .collect::<Result<_, _>>()?;
    let (hist, errors, elapsed) = drive(spec, move |worker, key, value| {
        let client = clients[worker].clone();
        async move { client.put(BENCH_TENANT, "kv", &key, value).await.is_ok() }
    })
    .await;
    Ok(report("escrow", spec, &hist, errors, elapsed))
}

/// Benchmarks puts against an etcd cluster at `endpoints`: plain HTTP, or TLS (`https://`
/// endpoints) verified against the CA in `ca_pem`.
#[cfg(feature = "etcd-bench")]
pub async fn run_etcd(
    endpoints: &[String],
    ca_pem: Option<Vec<u8>>,
    spec: &BenchSpec,
) -> anyhow::Result<BenchReport> {
    validate(spec)?;
    let options = ca_pem.map(|pem| {
        etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(pem)),
        )
    });
    let target = if options.is_some() {
        "etcd+tls"
    } else {
        "etcd"
    };
    let mut clients = Vec::new();
    for _ in 0..spec.clients {
        clients.push(etcd_client::Client::connect(endpoints, options.clone()).await?);
    }
    // One connection per worker; a KvClient clone shares it, so each call takes its own.
    let kvs: Vec<etcd_client::KvClient> = clients.into_iter().map(|c| c.kv_client()).collect();
    let (hist, errors, elapsed) = drive(spec, move |worker, key, value| {
        let mut kv = kvs[worker].clone();
        async move { kv.put(format!("bench/kv/{key}"), value, None).await.is_ok() }
    })
    .await;
    Ok(report(target, spec, &hist, errors, elapsed))
}

#[cfg(test)]
mod tests {
    use super::{drive, BenchSpec};
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    /// The keys one short run of two clients writes.
    async fn keys_of_a_run(new_keys: bool) -> BTreeSet<String> {
        let spec = BenchSpec {
            clients: 2,
            value_bytes: 8,
            duration: std::time::Duration::from_millis(20),
            compressible: false,
            new_keys,
        };
        let keys = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = keys.clone();
        drive(&spec, move |_, key, _| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().insert(key);
                tokio::task::yield_now().await;
                true
            }
        })
        .await;
        let keys = keys.lock().unwrap().clone();
        keys
    }

    #[tokio::test]
    async fn new_keys_give_every_run_keys_of_its_own() {
        let (a, b) = (keys_of_a_run(false).await, keys_of_a_run(false).await);
        assert!(a.contains("w0-0") && a.contains("w1-0") && b.contains("w0-0"));
        let (a, b) = (keys_of_a_run(true).await, keys_of_a_run(true).await);
        assert!(!a.is_empty() && !b.is_empty());
        assert!(a.is_disjoint(&b), "two runs with new keys share keys");
        assert!(a.iter().all(|k| k.starts_with('r') && k.contains("-w")));
    }

    #[test]
    fn values_are_random_unless_asked_to_compress() {
        let spec = |compressible, value_bytes| BenchSpec {
            clients: 1,
            value_bytes,
            duration: std::time::Duration::from_secs(1),
            compressible,
            new_keys: false,
        };
        let random = spec(false, 1024);
        let (a, b) = (random.value(), random.value());
        assert_eq!((a.len(), b.len()), (1024, 1024));
        assert_ne!(a, b, "every put writes a different value");
        // Random bytes: far from one repeated byte (the chance of 64 equal bytes is nil).
        assert!(a.iter().filter(|&&x| x == a[0]).count() < 64);
        assert_eq!(spec(true, 7).value(), b"xxxxxxx".to_vec());
    }
}
