import test from 'ava'
import { readFileSync } from 'node:fs'
import { nativeVersion } from '../src/index'

test('the native addon loads and reports the package version', (t) => {
  t.is(nativeVersion(), JSON.parse(readFileSync('package.json', 'utf8')).version)
})
