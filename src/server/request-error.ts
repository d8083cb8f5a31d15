import { capText } from '../errors'
import { MAX_ERROR_TEXT } from './options'

/** An error the server reports to the client (its message, cut to {@link MAX_ERROR_TEXT} bytes, goes into the error frame). */
export class RequestError extends Error {
  constructor(message: string) {
    super(capText(message, MAX_ERROR_TEXT))
  }
}
